"""Spaces install from requirements.txt, pip from pyproject: the two must agree."""

import re
import tomllib

from conftest import REPO


def _names(lines):
    return {
        re.split(r"[<>=!\[; ]", line.strip(), maxsplit=1)[0].lower()
        for line in lines
        if line.strip() and not line.lstrip().startswith(("#", "-"))
    }


def test_requirements_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = _names(project["dependencies"])
    spaces = _names((REPO / "requirements.txt").read_text().splitlines())
    assert required == spaces


def test_readme_has_space_front_matter_and_two_commands():
    text = (REPO / "README.md").read_text()
    assert text.startswith("---\n")
    front = text.split("---", 2)[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front
    commands = re.findall(r"```bash\n(.+?)\n```", text.split("## Set up", 1)[1].split("##", 1)[0])
    assert len(commands) == 2
    assert commands[0].endswith("python app.py")
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must call the README's test command verbatim"
