import pytest

from vlm_serving.generation.sampling import ParameterError, SamplingParams, TextAssembler


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
    ],
)
def test_out_of_bounds_parameters_name_the_field(params, message):
    with pytest.raises(ParameterError, match=message):
        params.validate(max_tokens_limit=100)


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
