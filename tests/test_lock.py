"""uv.lock, which the Modal image and deploy/Dockerfile install from, belongs to this
pyproject.toml: checked offline (`uv lock --check` would ask the package index)."""
import re
import tomllib

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from serve_process import ROOT


def terms(marker: str) -> frozenset:
    """The clauses of a marker of clauses joined by "and" (the only kind pyproject.toml has),
    in any order: uv writes them in its own."""
    return frozenset(str(Marker(term)) for term in marker.split(" and ") if term)


def requirement_set(requirements, extra: str = "") -> set:
    """Requirements (of `extra`, if given) as comparable (name, specifier set, marker)."""
    parsed = [Requirement(text) for text in requirements]
    return {(r.name.lower(), str(r.specifier),
             terms(" and ".join(filter(None, [str(r.marker or ""),
                                              extra and f'extra == "{extra}"']))))
            for r in parsed}


def locked_set(entries) -> set:
    return {(e["name"].lower(), str(SpecifierSet(e.get("specifier", ""))),
             terms(str(Marker(e["marker"])) if "marker" in e else "")) for e in entries}


def test_lock_was_made_from_this_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    root = next(p for p in lock["package"] if p["name"] == "serve-graph")
    wanted = requirement_set(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        wanted |= requirement_set(requirements, extra)
    locked = locked_set(root["metadata"]["requires-dist"])
    assert locked == wanted, "uv.lock is stale: run `uv lock`"
    assert set(root["metadata"]["provides-extras"]) == set(project["optional-dependencies"])


def test_lock_pins_the_tested_torch_and_one_ray():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {}
    for package in lock["package"]:
        versions.setdefault(package["name"], set()).add(package["version"])
    assert versions["torch"] == {"2.13.0"}
    assert len(versions["ray"]) == 1 and len(versions["demucs"]) == 1


def only_through(lock: dict, root: str, through: str) -> set:
    """The packages of `lock` that `root` depends on only through `through` (and it)."""
    needs: dict = {}
    for package in lock["package"]:
        wanted = needs.setdefault(package["name"], set())
        wanted |= {d["name"] for d in package.get("dependencies", [])}
        for extra in package.get("optional-dependencies", {}).values():
            wanted |= {d["name"] for d in extra}

    def reached(skip=None) -> set:
        seen, todo = set(), [root]
        while todo:
            name = todo.pop()
            if name not in seen and name != skip:
                seen.add(name)
                todo += needs.get(name, ())
        return seen
    return reached() - reached(skip=through)


def test_setup_leaves_out_exactly_torch_and_what_only_its_cuda_build_needs():
    """setup.sh installs everything from uv.lock but torch, whose CPU build pip installs: the
    packages it leaves out are torch and the CUDA ones nothing else needs; the CPU build's own
    dependencies (sympy, networkx...) still come from the lock."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    listed = re.search(r"CUDA_ONLY=\(([^)]*)\)", (ROOT / "setup.sh").read_text()).group(1)
    left_out = set(listed.split())
    torch_only = only_through(lock, "serve-graph", "torch")
    cuda = {name for name in torch_only if name.startswith(("nvidia-", "cuda-"))
            or name == "triton"}
    assert left_out == {"torch"} | cuda
    assert "networkx" in torch_only - left_out  # (sympy: einx, a dev package, needs it too)
    assert not {"sympy", "networkx", "filelock"} & left_out
