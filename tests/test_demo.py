"""`make demo` end to end at toy size: every run trains and the comparison table is printed."""
import re

from kdcore import demo


def test_demo_prints_the_comparison(capsys):
    assert demo.main(["--teacher-epochs", "1", "--epochs", "2", "--student-data", "600", "--quiet",
                      "--student-hidden", "32"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Fashion-MNIST test accuracy"):]
    assert "student mlp 784-32-10 on 600 labelled images" in table
    for name in ("teacher (mlp, all data)", "student alone (CE)", "student + KD", "student + DKD", "student + SLKD"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        last, best = (float(v) for v in re.findall(r"(\d+\.\d+)%", row)[:2])
        assert 10.0 < last <= best <= 100.0, row      # every run learned something (chance is 10%)
