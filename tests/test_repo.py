"""The README's two commands and CI stay true to each other."""
import os

from conftest import ROOT


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_run_and_test_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.index("```bash") < 200  # in the README's first lines
    run, test = readme_commands()[:2]
    assert run.endswith("python llmdpd_metaworld.py")
    assert "pytest" in test and test.startswith("pip install -r requirements.txt")


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert readme_commands()[1] in ci


def test_requirements_pin_the_cpu_torch_wheel():
    requirements = open(os.path.join(ROOT, "requirements.txt")).read().splitlines()
    assert "torch==2.13.0" in requirements
    for package in ("transformers", "gguf", "accelerate", "metaworld", "packaging", "minari", "tyro", "tensorboard",
                    "pytest", "h5py", "gymnasium", "mujoco"):
        assert any(line.startswith(package) for line in requirements), package
