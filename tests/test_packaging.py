"""Packaging: the README's example runs as printed; the wheel installs orbit_pyg.integrations."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import zipfile


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_ten_line_example_runs_as_printed(tmp_path):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    example = blocks[0]
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    split_form = blocks[1] if len(blocks) > 1 else ""
    script = tmp_path / "example.py"
    script.write_text(example + "\n" + split_form)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    value = float(out.stdout.strip().splitlines()[0])
    assert value > 0 and value == value  # a finite positive loss


def test_integrations_namespace_importable():
    import orbit_pyg.integrations as integ

    assert integ.__name__ == "orbit_pyg.integrations"


def test_wheel_contains_namespaced_integrations_and_imports(tmp_path):
    """Build the wheel, install it into an isolated target, import from there (not the source tree)."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("orbit_pyg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orbit_pyg/integrations/__init__.py" in names
    # every package of the source tree ships (pyproject lists them explicitly)
    for init in sorted((ROOT / "orbit_pyg").rglob("__init__.py")):
        assert init.relative_to(ROOT).as_posix() in names, f"{init} missing from the wheel"
    for init in sorted((ROOT / "integrations").rglob("__init__.py")):
        inside = "orbit_pyg/integrations/" + init.relative_to(ROOT / "integrations").as_posix()
        assert inside in names, f"{init} missing from the wheel"
    assert not any(n.startswith("integrations/") for n in names), "integrations must not be a top-level package"
    target = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert inst.returncode == 0, inst.stderr
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import orbit_pyg, orbit_pyg.integrations as i; "
        "assert orbit_pyg.__file__.startswith(sys.argv[1]), orbit_pyg.__file__; "
        "assert i.__file__.startswith(sys.argv[1]), i.__file__; print('ok')"
    )
    # -S -I would drop site-packages (torch); run from an empty cwd with the editable finder shadowed
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
