"""The demo's live progress (cifhkd.progress): train_log.jsonl parsing, the status of the
trainings side by side and of the decodings, and the status line on a terminal and in a log."""
import io
import json
import time

from cifhkd import progress


def write_log(exp, rows, tail=""):
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_last_logged_skips_a_line_being_written(tmp_path):
    assert progress.last_logged(tmp_path / "none") is None
    write_log(tmp_path, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5}], tail='{"step": 30, "lo')
    assert progress.last_logged(tmp_path) == {"step": 20, "loss": 2.5}
    write_log(tmp_path, [], tail='{"step": 3')
    assert progress.last_logged(tmp_path) is None


def test_duration():
    assert [progress.duration(s) for s in (0, 42.4, 725, 3720, -3)] == ["0s", "42s", "12m05s", "1h02m", "0s"]


def test_training_status_steps_loss_elapsed_and_time_left(tmp_path):
    cif = progress.Training("CIF", tmp_path / "cif", budget=2000)
    assert cif.status(0.0) == "CIF waiting"
    cif.begin()                                     # no log yet: from step 0
    assert cif.start_step == 0 and cif.status(cif.start + 5) == "CIF starting, 5s"
    write_log(tmp_path / "cif", [{"step": 490, "loss": 2.9}, {"step": 500, "loss": 2.3456}])
    # 500 steps in 250 s: 0.5 s a step, 1500 to go
    assert cif.status(cif.start + 250) == "CIF 500/2000 loss 2.346, 4m10s, 12m30s left"
    # a resumed run counts its own steps only: 100 in 50 s
    hkd = progress.Training("CIF + HKD", tmp_path / "cif", budget=2000)
    write_log(tmp_path / "cif", [{"step": 400, "loss": 3.1}])
    hkd.begin()
    assert hkd.start_step == 400 and hkd.status(hkd.start + 50, {"step": 500, "loss": 2.0}) == \
        "CIF + HKD 500/2000 loss 2.000, 50s, 12m30s left"
    no_budget = progress.Training("CIF", tmp_path / "cif")
    no_budget.begin()
    assert no_budget.status(no_budget.start + 10, {"step": 401}) == "CIF step 401, 10s"
    cif.state = "done"
    assert cif.status(0.0) == "CIF done"


def test_phase_renders_the_systems_side_by_side(tmp_path):
    write_log(tmp_path / "cif", [{"step": 100, "loss": 3.0}])
    training = progress.Phase("training", {"cif": progress.Training("CIF", tmp_path / "cif", 400),
                                           "hkd": progress.Training("CIF + HKD", tmp_path / "hkd", 400)},
                              start=1000.0)
    training.items["cif"].state, training.items["cif"].start = "running", 1000.0
    assert training.render(now=1060.0) == "demo: training 1m00s | CIF 100/400 loss 3.000, 1m00s, 3m00s left | " \
                                          "CIF + HKD waiting"
    decoding = progress.Phase("decoding", {"cif": progress.Decoding("CIF", 4), "hkd": progress.Decoding("CIF + HKD", 4)},
                              start=0.0)
    decoding.items["hkd"].done = 3
    assert decoding.render(now=12.0) == "demo: decoding 12s | CIF 0/4 | CIF + HKD 3/4"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_in_a_log_prints_lines_and_messages():
    count = iter(range(1000))
    log = io.StringIO()
    with progress.StatusLine(lambda: f"status {next(count)}", log, plain_interval=0.05) as status:
        time.sleep(0.5)
        status.say("a message")
    lines = log.getvalue().splitlines()
    assert "a message" in lines and "\r" not in log.getvalue()
    shown = [line for line in lines if line != "a message"]
    assert len(shown) >= 3 and shown == [f"status {i}" for i in range(len(shown))]   # the last at the end


def test_status_line_on_a_terminal_is_rewritten_in_place():
    terminal = Terminal()
    text = {"now": "CIF 1/4"}
    with progress.StatusLine(lambda: text["now"], terminal, interval=0.01, plain_interval=60) as status:
        deadline = time.monotonic() + 10
        while "CIF 1/4" not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        status.say("demo: training CIF")           # above the status, which is drawn again
        text["now"] = "CIF 2/4"
        time.sleep(0.05)
    out = terminal.getvalue()
    assert out.startswith("CIF 1/4\r\033[K") and "\r\033[Kdemo: training CIF\nCIF 1/4" in out
    assert out.endswith("\r\033[KCIF 2/4\n")                                 # the final status, kept
    assert out.count("\n") == 2                                              # the message, the end
