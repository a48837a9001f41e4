"""The cancellation board: a request, and the sub-requests model auto makes for it."""

from vlm_serving.generation.cancellation import CancellationBoard, subrequest_id


def test_cancelling_a_request_cancels_its_subrequests_and_not_the_other_way_round(tmp_path):
    board = CancellationBoard(tmp_path / "board")
    board.cancel("a")
    assert board.is_cancelled("a") and board.is_cancelled(subrequest_id("a", "qwen2_5_vl"))
    board.cancel(subrequest_id("b", "qwen2_5_vl"))
    assert board.is_cancelled(subrequest_id("b", "qwen2_5_vl"))
    assert not board.is_cancelled("b") and not board.is_cancelled(subrequest_id("b", "pixtral"))
    assert not board.is_cancelled("") and not board.is_cancelled("c")
    # A reader on the same file (another generation instance) sees the same.
    assert CancellationBoard(tmp_path / "board").is_cancelled(subrequest_id("a", "pixtral"))
