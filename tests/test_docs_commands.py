"""Every command in README.md and docs/*.md runs as written.

Each code line of the pages is read as a shell command. `flowpre` commands (also under
torchrun, the deepspeed launcher and launchers/*.sh) are parsed by the real CLI parser and
their dotted overrides by the config loader; scripts must exist. Synopsis notation is read as
a user would fill it in: `[--flag X]` as given, `a|b|c` as its first choice. The cheap ones
run: the quickstart's train (2 steps, on 200 Fashion-MNIST images), export, sample and
--plan, and the README's Python snippet, in a scratch folder laid out like a checkout.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path


from flowpre.cli import build_parser
from flowpre.config import ConfigError, load_config

from helpers import env, flowpre as run_cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def code_blocks(text):
    """(lines of indented or fenced code) of one markdown page, continuation lines joined."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.strip().startswith("```"):
            if fenced:
                blocks.append(current)
                current = []
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") and line.strip():
            current.append(line.strip())
        elif current and not line.strip():
            continue
        elif current:
            blocks.append(current)
            current = []
    blocks.append(current)
    joined = []
    for block in blocks:
        lines = []
        for line in block:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line
            else:
                lines.append(line)
        joined.append(lines)
    return [b for b in joined if b]


def shell_lines(page):
    """The shell commands of a page: code lines that are not Python, YAML or tables."""
    out = []
    for block in code_blocks(page.read_text()):
        if any(line.startswith(("import ", "from ", "pipe", "images")) for line in block):
            continue  # a Python snippet
        for line in block:
            line = re.sub(r"\s+#.*$", "", line)  # a trailing comment (never inside these commands' quotes)
            if not line or line.startswith(("#", "|", "-")) or ":" in line.split()[0]:
                continue
            out.extend(part.strip() for part in line.split("&&"))
    return out


def fill_in(tokens):
    """Synopsis notation -> one concrete command line."""
    words = []
    for token in tokens:
        token = token.strip("[]")
        if not token or token == "...":
            continue
        if "|" in token and not token.startswith(("'", '"')):
            token = token.split("|")[0]
        words.append("2" if re.fullmatch(r"[A-Z]", token) else token)  # a count: --shard-size N
    return words


def flowpre_args(words):
    """The `flowpre` argument list inside a command, or None when it runs something else."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    if words[0] == "flowpre":
        return words[1:]
    if "flowpre.cli" in words:
        return words[words.index("flowpre.cli") + 1:]
    for i, w in enumerate(words):
        if w.startswith("launchers/") and w.endswith((".sh", ".sbatch")) and not w.endswith(("gpu_check.sh",
                                                                                                  "gpu_wheels.sh")):
            return ["train", *words[i + 1:]]
    return None


def strict_parser():
    """The CLI's parser without prefix matching: a page must spell every flag in full."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.allow_abbrev = False
    return parser


def check_command(words):
    """'' when the command is right, else what is wrong with it."""
    scripts = [w for w in words if w.endswith((".py", ".sh", ".sbatch")) and "/" in w]
    for script in scripts:
        if not (ROOT / script).is_file():
            return f"{script} does not exist"
    args = flowpre_args(list(words))
    if args is None:
        return ""
    try:
        parsed = strict_parser().parse_args(args)
    except SystemExit:
        return f"the CLI refuses: flowpre {' '.join(args)}"
    if parsed.command == "train":
        overrides = [o for o in parsed.overrides if "." in o.split("=", 1)[0]]
        config = ROOT / parsed.config
        try:
            load_config(config if config.is_file() else None, overrides)
        except ConfigError as e:
            return str(e)
    return ""


def all_commands():
    return [(page.relative_to(ROOT), line) for page in PAGES for line in shell_lines(page)]


def test_every_documented_command_parses():
    commands = all_commands()
    flowpre_commands = [c for c in commands if flowpre_args(fill_in(shlex.split(c[1])))]
    assert len(flowpre_commands) >= 25, flowpre_commands  # the extraction found them
    problems = [f"{page}: {line}\n    {problem}" for page, line in commands
                if (problem := check_command(fill_in(shlex.split(line))))]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_flag_key_or_script():
    assert "refuses" in check_command(["flowpre", "sample", "--weight", "m.safetensors"])
    assert "train.max_step" in check_command(["flowpre", "train", "--config", "FILE", "train.max_step=3"])
    assert "does not exist" in check_command(["python", "experiments/nothing.py"])
    assert check_command(fill_in(shlex.split("flowpre export --run RUN --out M [--ema slow|fast|none]"))) == ""


def test_no_issue_numbers_and_links_resolve():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\bissues?\s*#?\d+", text, re.I), page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which is missing"


def test_readme_quickstart_and_python_run_as_written(tmp_path):
    """The quickstart's commands in a scratch checkout: configs/ linked, 200 real images."""
    from flowpre.data.shards import write_shards

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    write_shards("fashion-mnist", tmp_path / "data" / "fashion-mnist", shard_size=100, split="train", limit=200)
    readme = shell_lines(ROOT / "README.md")
    quick = [line for line in readme if line.startswith("flowpre ") and ("runs/quickstart" in line
             or "fashion-dit" in line)]
    quick += [line for line in shell_lines(ROOT / "docs" / "cli.md") if "--plan" in line]
    short = ["train.max_steps=2", "train.batch_size=8", "sample.every=0", "sample.num_images=4", "data.num_workers=0"]
    ran = []
    for line in ["flowpre train --config configs/quickstart.yaml", *quick]:
        args = fill_in(shlex.split(line))[1:]
        if args[0] == "eval":
            continue  # minutes of sampling: parsed by the test above
        if args[0] == "train":
            args = [a if a != "FILE" else "configs/quickstart.yaml" for a in args]
            args = [a for a in args if not a.startswith("train.max_steps=")] + ([] if "--plan" in args else short)
        r = subprocess.run([sys.executable, "-m", "flowpre.cli", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600, env=env())
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        ran.append(args[0])
    assert ran.count("train") == 2 and "export" in ran and "sample" in ran
    assert (tmp_path / "fashion-dit" / "README.md").is_file() and (tmp_path / "grid.png").is_file()
    snippet = next(b for b in code_blocks((ROOT / "README.md").read_text()) if b[0].startswith("import flowpre"))
    code = "\n".join(snippet) + "\nassert len(images) == 2 and images[0].size == (28, 28)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_cli("sample", "--help").stdout.startswith("usage: flowpre sample")
