import pytest

from vlm_serving.generation.sampling import ParameterError, SamplingParams, TextAssembler
from vlm_serving.generation.structured import ResponseFormat


class CharTokenizer:
    """Token i is the i-th character of a fixed alphabet; -1 is half of a two-byte character."""

    alphabet = "abcdefghij <>é"

    def decode(self, ids, **kwargs):
        text = ""
        for i, token in enumerate(ids):
            if token == -1:
                # A lone first byte decodes to U+FFFD, as byte-level BPE does mid-character.
                text += "é" if i + 1 < len(ids) and ids[i + 1] == -2 else "\ufffd"
            elif token == -2:
                continue
            else:
                text += self.alphabet[token]
        return text


def feed(assembler, text_tokens):
    return [assembler.add(token) for token in text_tokens]


def ids(text):
    return [CharTokenizer.alphabet.index(ch) for ch in text]


def test_deltas_join_to_the_text():
    assembler = TextAssembler(CharTokenizer())
    deltas = feed(assembler, ids("abc de")) + [assembler.flush()]
    assert "".join(deltas) == assembler.text == "abc de"


def test_stop_sequence_truncates_and_is_never_sent():
    assembler = TextAssembler(CharTokenizer(), stop=("<e>",))
    deltas = feed(assembler, ids("ab<e>cd")[:5])
    assert assembler.stopped and assembler.text == "ab"
    assert "".join(deltas) == "ab"
    assert deltas[2:] == ["", "", ""]  # "<", "<e" held back while they could start the stop


def test_held_prefix_is_released_when_it_does_not_complete():
    assembler = TextAssembler(CharTokenizer(), stop=("<e>",))
    deltas = feed(assembler, ids("a<ej"))
    assert deltas == ["a", "", "", "<ej"] and not assembler.stopped


def test_incomplete_utf8_is_held_back():
    assembler = TextAssembler(CharTokenizer())
    assert assembler.add(ids("a")[0]) == "a"
    assert assembler.add(-1) == ""
    assert assembler.add(-2) == "é"


def test_earliest_of_several_stops_wins():
    assembler = TextAssembler(CharTokenizer(), stop=("cd", "b"))
    feed(assembler, ids("abcd"))
    assert assembler.text == "a"


def test_defaults_are_valid():
    SamplingParams().validate(max_tokens_limit=4096)


@pytest.mark.parametrize(
    "params,message",
    [
        (SamplingParams(max_tokens=0), "max_tokens=0 must be in \\[1, 100\\]"),
        (SamplingParams(max_tokens=101), "max_tokens=101"),
        (SamplingParams(temperature=-0.1), "temperature=-0.1 must be in \\[0, 2\\]"),
        (SamplingParams(top_p=0.0), "top_p=0 must be in \\(0, 1\\]"),
        (SamplingParams(top_k=-1), "top_k=-1"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty=0"),
        (SamplingParams(stop=("",)), "stop sequence must be 1 to 64"),
        (SamplingParams(stop=tuple("abcdefghi")), "9 stop sequences is over the limit of 8"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty=2.5 must be in \\[-2, 2\\]"),
        (SamplingParams(frequency_penalty=-2.01), "frequency_penalty=-2.01 must be in \\[-2, 2\\]"),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs=21 must be in \\[0, 20\\]"),
        (SamplingParams(logprobs=True, top_logprobs=-1), "top_logprobs=-1 must be in \\[0, 20\\]"),
        (SamplingParams(top_logprobs=5), "top_logprobs=5 needs logprobs true"),
        (SamplingParams(max_tokens=-3), "max_tokens=-3 must be in \\[1, 100\\]"),
        # A stop sequence would cut the answer before its format is complete (invalid JSON, reported STOP).
        (SamplingParams(stop=("}",), response_format=ResponseFormat("json_object")),
         "stop sequences cannot end a constrained answer"),
        (SamplingParams(stop=("no",), response_format=ResponseFormat("choice", choices=("yes", "no"))),
         "stop sequences cannot end a constrained answer"),
    ],
)
def test_out_of_bounds_parameters_name_the_field(params, message):
    with pytest.raises(ParameterError, match=message):
        params.validate(max_tokens_limit=100)
    [(name, _)] = params.violations(max_tokens_limit=100)
    assert name in message


def test_the_new_fields_at_their_bounds_are_valid():
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, logprobs=True, top_logprobs=20).validate(100)


def test_an_unset_max_tokens_takes_the_room_it_is_given():
    from vlm_serving.generation.sampling import SamplingDefaults

    assert SamplingParams().max_tokens is None
    assert SamplingParams().resolve(SamplingDefaults(), room=300).max_tokens == 300
    assert SamplingParams(max_tokens=20).resolve(SamplingDefaults(), room=300).max_tokens == 20


@pytest.mark.parametrize("family", ["qwen2_5_vl", "pixtral"])
def test_windowed_decoding_equals_decoding_everything(checkpoints, family):
    """Random byte-level tokens split characters across tokens: the window must still be exact."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints / family)
    rng = random.Random(family)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 120))]
        assembler = TextAssembler(tokenizer)
        deltas = [assembler.add(token) for token in ids] + [assembler.flush()]
        whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert assembler.text == whole and "".join(deltas) == whole


@pytest.mark.parametrize("family", ["qwen2_5_vl", "pixtral"])
def test_token_bytes_are_exact_and_a_split_character_shows_u_fffd(checkpoints, family):
    import random

    from transformers import AutoTokenizer

    from vlm_serving.generation.sampling import TokenBytes

    tokenizer = AutoTokenizer.from_pretrained(checkpoints / family)
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode("é café, naïve 日本", add_special_tokens=False)
    entries = [token_bytes.entry(token, -1.0) for token in ids]
    assert b"".join(bytes(entry["bytes"]) for entry in entries).decode("utf-8") == "é café, naïve 日本"
    split = [entry for entry in entries if entry["token"] == "\ufffd"]
    assert split and all(len(entry["bytes"]) == 1 and entry["bytes"][0] >= 0x80 for entry in split)
    special = sorted(tokenizer.added_tokens_decoder)[0]
    assert token_bytes(special) == str(tokenizer.added_tokens_decoder[special]).encode()
    rng = random.Random(family)
    text_ids = [token for token in range(len(tokenizer)) if token not in tokenizer.added_tokens_decoder]
    for _ in range(20):
        sample = [rng.choice(text_ids) for _ in range(rng.randrange(1, 60))]
        whole = tokenizer.decode(sample, clean_up_tokenization_spaces=False)
        assert b"".join(map(token_bytes, sample)).decode("utf-8", errors="replace") == whole


def test_token_bytes_of_a_tokenizer_that_is_not_byte_level_are_each_tokens_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlm_serving.generation.sampling import TokenBytes

    backend = Tokenizer(models.WordLevel({"naïve": 0, "word": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    token_bytes = TokenBytes(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert token_bytes.entry(0, -0.5) == {"token": "naïve", "bytes": list("naïve".encode()), "logprob": -0.5}
