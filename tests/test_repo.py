"""The project's own contract: CI runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    cmds = readme_commands()
    assert len(cmds) == 2 and cmds[0].endswith("just demo") and cmds[1].endswith("just test")
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [cmds[1]]
