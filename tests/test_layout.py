"""The package's layout: imports run one way, from the entry points down to errors, and never in a circle.

Layers, lowest first (a module may import its own package and any lower layer, never a higher one):

    errors, batch      what everything shares: the user-facing errors, the batch's keys
    runtime            processes: signals, ranks, the run lock, the NaN guard, exiting, checkpoint integrity, compat
    config             arguments, concepts, parsing
    families           what differs between SD 1.x/2.x, SDXL and SD3; component loading
    modeling           the DreamBooth model, objectives, losses, LoRA, EMA, optimizers, clipping
    inference          the sampling set-up and the generation loop
    data, toyworld     photos, buckets, the dataset, class images; the synthetic world
    interop            files for other tools: key maps, single files, exports, merge, model card, pipeline folder, hub
    evaluation         DINO, CLIP scoring, prompts, evaluation runs and reports
    training           the trainer, pre-flight checks, callbacks, validation, console, caching, the run
    entry points       train, train_lora, evaluate, export, generate, demo

Imports inside functions count too: deferring a heavy optional dependency is fine, dodging a circle is not.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ppdreambooth")
LAYERS = [
    {"errors", "batch"},
    {"runtime"},
    {"config"},
    {"families"},
    {"modeling"},
    {"inference"},
    {"data", "toyworld"},
    {"interop"},
    {"evaluation"},
    {"training"},
    {"train", "train_lora", "evaluate", "export", "generate", "demo", "__init__"},
]
ENTRY_POINTS = LAYERS[-1]


def package_modules():
    """{dotted module name (without `ppdreambooth.`): file path} of every module of the package."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[dotted] = path
    return found


def imports_of(dotted, path, modules):
    """The package modules `dotted` imports (anywhere in the file), as dotted names."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    here = dotted.split(".")[:-1]  # the package a relative import starts from (for `x/__init__`: x itself)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "ppdreambooth" or node.module.startswith("ppdreambooth.")):
                target = node.module[len("ppdreambooth"):].lstrip(".")
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                if candidate in modules or f"{candidate}.__init__" in modules:
                    found.add(candidate)
                else:
                    found.add(target or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ppdreambooth."):
                    found.add(alias.name[len("ppdreambooth."):])
    resolved = set()
    for name in found:
        resolved.add(name if name in modules else f"{name}.__init__" if f"{name}.__init__" in modules else name)
    resolved.discard(dotted)
    return resolved


def import_graph():
    modules = package_modules()
    return {dotted: imports_of(dotted, path, modules) for dotted, path in modules.items()}


def top_package(dotted):
    return dotted.split(".")[0]


def layer_of(dotted):
    top = top_package(dotted)
    for n, layer in enumerate(LAYERS):
        if top in layer:
            return n
    raise AssertionError(f"ppdreambooth.{dotted} is in no layer: add its package to LAYERS in {__file__}")


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_in_a_layer():
    for dotted in package_modules():
        layer_of(dotted)


def test_no_import_runs_against_the_direction():
    against = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            same_package = top_package(module) == top_package(target) and top_package(module) not in ENTRY_POINTS
            entry_to_entry = module in ENTRY_POINTS and target in ENTRY_POINTS
            if not (same_package or entry_to_entry or layer_of(target) < layer_of(module)):
                against.append(f"ppdreambooth.{module} imports ppdreambooth.{target}")
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_there_are_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(component) for component in found)


def test_the_checker_sees_circles_and_upward_imports(tmp_path):
    """The checks above can fail: a made-up graph with a circle and a layer skipped upwards is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("training.run") > layer_of("modeling.model") > layer_of("errors")
    module = tmp_path / "probe.py"
    module.write_text("from ppdreambooth.training.run import run\n\ndef f():\n    from ..errors import ConfigError\n")
    assert imports_of("modeling.probe", str(module), {"training.run": "", "errors": ""}) == {"training.run",
                                                                                              "errors"}
