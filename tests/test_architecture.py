"""The package's import graph: no cycles between its parts, and dependencies pointing the documented way.

The graph is read from the source (every `import`, including those inside functions, which is where the
command modules import the heavy parts), so a cycle that only shows at run time is still caught here.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "personamagic"

# parts that everything may use
FOUNDATION = {"errors", "personamagic"}
# the method and the family seam know nothing of the rest of the package
SELF_CONTAINED = {"method", "families"}
# what a user runs; nothing below them may import them
FRONT_ENDS = {"cli", "ui", "evaluation"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: pathlib.Path, *, type_checking: bool = True) -> set[str]:
    """The package's modules `path` imports, inside functions too; `type_checking=False`: not those
    imported only for annotations (under `if TYPE_CHECKING:`), which never run."""
    name = _module_name(path)
    # the package a relative import is resolved against
    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    skipped = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                skipped.update(id(n) for statement in node.body for n in ast.walk(statement))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module)
                continue
            base = anchor[: len(anchor) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # `from . import x`: x may be a module
                found.update(".".join([*base, alias.name]) for alias in node.names)
    return {m for m in found if m == "personamagic" or m.startswith("personamagic.")}


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to (`personamagic` for the root)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return "personamagic"
    return parts[1]


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _part(_module_name(path))
        targets = {_part(m) for m in _imported_modules(path)} - {source}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_layering():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read_from_the_real_package():
    graph = part_graph()
    # facts any reader can check in the source: the CLI runs the jobs, the trainer uses the method
    assert "jobs" in graph["cli"]
    assert "method" in graph["training"]
    assert {"method", "families", "models", "training", "pipeline", "jobs"} <= set(graph)


def test_the_package_has_no_import_cycles():
    assert find_cycle(part_graph()) is None


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports when it runs (inside functions too, not for annotations only),
    without the edges into a package's `__init__` (a package imports its own modules by design). So a
    cycle through a package's re-exports (`from ..training import Trainer`) is not seen here; the parts'
    graph above sees it at the level of the parts."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    packages = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    return {name: _imported_modules(path, type_checking=False) - packages - {name}
            for name, path in paths.items() if name not in packages}


def test_no_two_modules_import_each_other_even_inside_functions():
    # an import inside a function hides a cycle from Python, not from the reader: the record of an
    # image builds on the job's settings, and the job on both, never the other way round
    assert find_cycle(module_graph()) is None
    assert "personamagic.jobs.generate" not in module_graph()["personamagic.jobs.image_record"]


@pytest.mark.parametrize("part", sorted(SELF_CONTAINED))
def test_the_method_and_the_family_seam_depend_only_on_errors(part):
    assert part_graph()[part] <= FOUNDATION


def test_models_faces_and_identity_do_not_reach_up_into_training_or_generation():
    graph = part_graph()
    upper = {"training", "pipeline", "jobs", *FRONT_ENDS}
    for part in ("models", "faces", "identity"):
        assert not graph[part] & upper, (part, graph[part] & upper)


def test_only_front_ends_import_the_front_ends():
    graph = part_graph()
    for part, targets in graph.items():
        if part in FRONT_ENDS:
            continue
        assert not targets & FRONT_ENDS, (part, targets & FRONT_ENDS)


# --------------------------------------------------------------------------------------------------
# the family seam is asked, not bypassed

# Modules that still test a family outside `families/`, each with the question it should ask instead
# (none today; an entry must name the module and the comparison, and is dropped once it is gone).
FAMILY_TEST_ALLOWED: set[tuple[str, str]] = set()


def _family_words() -> tuple[set[str], set[str]]:
    """(strings that name a family, identifiers bound to a family or its short model names) outside
    `families/`: the families' names, diffusers pipeline classes and built models' short names; the
    family objects, their classes and the model-name constants of `models.tiny`."""
    import personamagic.families as families
    import personamagic.models.tiny as tiny

    strings, names = set(), {"ModelFamily"}
    for family in families.FAMILIES.values():
        strings |= {family.name, family.pipeline_class, family.tiny_model, family.random_model}
        names.add(type(family).__name__)
    names |= {key for key, value in vars(families).items() if isinstance(value, families.ModelFamily)}
    names |= {key for key, value in vars(tiny).items() if key.isupper() and isinstance(value, str) and value in strings}
    # `tiny` also names every other offline toy (the image encoder, CLIP, the identity network), so a
    # comparison with it says "a toy", not "SD-1.x"; `model in TINY_MODELS` is how to ask for any family's
    strings.discard("tiny")
    names.discard("TINY")
    return strings, names


def family_tests(source: str) -> list[str]:
    """The comparisons and type checks in `source` that test which family something is: `==`, `!=`,
    `in`, `is` against a family's name or short model name, or `isinstance`/`type` with a family's class.
    A name looked up in a collection (`"sdxl" in sections`) is a lookup, not a family test."""
    strings, names = _family_words()

    def names_a_family(node) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_a_family(e) for e in node.elts)
        if isinstance(node, ast.Constant):
            return node.value in strings
        if isinstance(node, ast.Name):
            return node.id in names
        return isinstance(node, ast.Attribute) and node.attr in names

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, (left, right) in zip(node.ops, zip(operands, operands[1:])):
                lookup = isinstance(op, (ast.In, ast.NotIn)) and isinstance(left, ast.Constant) and not isinstance(
                    right, (ast.Tuple, ast.List, ast.Set))
                if not lookup and (names_a_family(left) or names_a_family(right)):
                    found.append(ast.unparse(node))
                    break
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "type"):
            if any(names_a_family(arg) for arg in node.args[1:]) or (
                    node.func.id == "type" and any("family" in ast.unparse(arg) for arg in node.args)):
                found.append(ast.unparse(node))
    return found


def test_the_family_test_finder_finds_name_and_type_tests_and_passes_questions():
    tests = family_tests(
        "if base.family.name != 'sdxl': pass\n"
        "if model not in (TINY_SDXL, RANDOM_SDXL): pass\n"
        "if family.pipeline_class == 'StableDiffusionPipeline': pass\n"
        "if isinstance(family, StableDiffusionXL): pass\n"
        "if pipe.family is SDXL: pass\n"
        "if type(base.family).__name__ == 'X': pass\n"
        "toy = model == 'random-sd1'\n"
    )
    assert len(tests) == 7, tests
    assert family_tests(
        "if not family.supports_photomaker: pass\n"
        "toy = model in TINY_MODELS\n"
        "encoder = TINY if name == TINY else other\n"
        "if 'sdxl' in sections: pass\n"
        "model = SDXL.random_model if gpu else SDXL.tiny_model\n"
        "if concept.family != self.family.name: pass\n"
    ) == []


def test_no_module_outside_the_families_tests_which_family_it_has():
    found = {(relative, test) for relative, tests in findings(family_tests, outside="families/").items()
             for test in tests}
    assert found <= FAMILY_TEST_ALLOWED, sorted(found - FAMILY_TEST_ALLOWED)
    assert FAMILY_TEST_ALLOWED <= found, f"no longer there, drop from the allow-list: {FAMILY_TEST_ALLOWED - found}"


# --------------------------------------------------------------------------------------------------
# errors by layer: the library raises ordinary exceptions; exit codes are the command line's


# the field that holds the name a node uses: a name, an attribute, an import, a parameter, a keyword
_NAME_FIELDS = {ast.Name: "id", ast.Attribute: "attr", ast.alias: "name", ast.arg: "arg", ast.keyword: "arg"}


def exit_code_mentions(source: str) -> list[str]:
    """Where `source` names the command line's error class (`UserError`) or an `exit_code` (an attribute,
    a name, an import, a parameter or a keyword)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = getattr(node, _NAME_FIELDS.get(type(node), ""), None)
        if name in ("UserError", "exit_code"):
            found.append(f"line {node.lineno}: {name}")
    return found


def test_the_exit_code_finder_finds_names_attributes_parameters_and_imports():
    assert len(exit_code_mentions(
        "from ..errors import UserError\n"
        "raise UserError('x')\n"
        "code = err.exit_code\n"
        "def stop(message, exit_code=2): pass\n"
        "stop('x', exit_code=130)\n"
    )) == 5
    assert exit_code_mentions("from ..errors import SettingsError\nraise SettingsError('exit_code')\n") == []


def findings(finder, outside: str) -> dict[str, list]:
    """What `finder` finds in each module of the package but those whose path starts with `outside`."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if not relative.startswith(outside) and (hits := finder(path.read_text())):
            found[relative] = hits
    return found


def test_no_module_below_the_command_line_raises_user_error_or_knows_exit_codes():
    found = findings(exit_code_mentions, outside="cli/")
    assert not found, found


# --------------------------------------------------------------------------------------------------
# weights files are read in one place: `files.read_weights` (no pickled code runs, one error per failure)

WEIGHTS_READER = "files.py"
_SAFETENSORS_READERS = {"load_file", "load", "safe_open"}


def direct_weight_reads(source: str) -> list[str]:
    """Where `source` reads a weights file itself: imports safetensors' readers, or calls `torch.load`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "safetensors":
            found += [f"line {node.lineno}: {a.name}" for a in node.names if a.name in _SAFETENSORS_READERS]
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in ("torch.load", "safetensors.torch.load_file"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_weight_read_finder_finds_imports_and_calls_and_passes_writers():
    assert len(direct_weight_reads(
        "from safetensors.torch import load_file\n"
        "from safetensors import safe_open\n"
        "state = torch.load(path)\n"
        "state = safetensors.torch.load_file(path)\n"
    )) == 4
    assert direct_weight_reads("from safetensors.torch import save_file\nfrom ..files import read_weights\n") == []


def test_weights_are_read_only_by_the_one_safe_reader():
    found = findings(direct_weight_reads, outside=WEIGHTS_READER)
    assert not found, f"read weights with personamagic.files.read_weights: {found}"


# --------------------------------------------------------------------------------------------------
# one name for the default base model: `personamagic.DEFAULT_BASE_MODEL`


def test_the_paper_studies_take_the_default_base_model_from_its_one_constant():
    # in a fresh process, so that the presets are built after the constant is changed
    code = ("import personamagic; personamagic.DEFAULT_BASE_MODEL = 'Org/Other'; "
            "from personamagic.evaluation.presets import STUDY_PRESETS; print(STUDY_PRESETS['table1']['model'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["Org/Other"], run.stderr
