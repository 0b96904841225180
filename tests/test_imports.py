"""The house's stairs go one way (README, "Who imports whom"): leaves import nothing from the repo, the shared
floor imports only leaves and itself downwards, scripts import the floor and leaves but never another script
(chat_ui.py, the one application that composes others, may import rag.py and quantize.py), and no file imports
its way round in a circle. Checked on the source, imports inside functions included.

    python tests/test_imports.py          # prints the graph as arrows
"""
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith('.py'))

LEAVES = {'model', 'bpe'}                          # copied alone into other projects
FLOOR = {'configurator': set(),                    # the standard library only: prepare.py runs without torch
         'weights': {'model', 'bpe', 'configurator'},
         'train': {'model', 'bpe', 'configurator', 'weights', 'quantize'}}
# quantize.py is a library (quantized Linears, quantize/save/load: model.py beside it is all it needs) with a
# command line at its end; only that command line (imports inside its functions) reaches up to the floor. Its
# library part may be imported like model.py (finetune_lora.py's QLoRA uses its NF4Linear); its command line is
# a script
QUANTIZE_LIBRARY = {'model'}
SCRIPTS = {'prepare', 'sample', 'finetune_lora', 'rag', 'chat_ui', 'eval'}
ALLOWED_SCRIPT_IMPORTS = {'chat_ui': {'rag', 'quantize'}}
TOOLS = {'bench'}                                  # measures everything, so it may import anything


def imports(name):
    """{(module, top_level)} of the repo modules that name.py imports; top_level False inside a function or the
    `if __name__ == '__main__':` block (the command line)."""
    tree = ast.parse(open(os.path.join(REPO, name + '.py'), encoding='utf-8').read())
    found = set()

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            main = isinstance(child, ast.If) and "__name__ == '__main__'" in ast.unparse(child.test)
            inner = top and not main and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.update((a.name.split('.')[0], top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add((child.module.split('.')[0], top))
            visit(child, inner)
    visit(tree, True)
    return {(m, top) for m, top in found if m in MODULES and m != name}


GRAPH = {m: imports(m) for m in MODULES}


def edges(m, top_only=False):
    return {t for t, top in GRAPH[m] if top or not top_only}


def test_every_file_has_a_floor():
    placed = LEAVES | set(FLOOR) | {'quantize'} | SCRIPTS | TOOLS
    assert set(MODULES) <= placed, f"give {sorted(set(MODULES) - placed)} a place in the house (and the README)"


def test_leaves_import_nothing_from_the_repo():
    for m in LEAVES:
        assert not edges(m), f"{m}.py is copied alone into other projects, but imports {sorted(edges(m))}"


def test_the_floor_imports_only_downwards():
    for m, allowed in FLOOR.items():
        assert edges(m) <= allowed, f"{m}.py imports {sorted(edges(m) - allowed)}"
    assert edges('quantize', top_only=True) <= QUANTIZE_LIBRARY, \
        f"quantize.py's library part imports {sorted(edges('quantize', True) - QUANTIZE_LIBRARY)}"
    assert edges('quantize') <= LEAVES | set(FLOOR), "quantize.py's command line imports a script"


def test_scripts_never_import_scripts():
    for m in SCRIPTS & set(MODULES):
        bad = edges(m) & SCRIPTS - ALLOWED_SCRIPT_IMPORTS.get(m, set())
        assert not bad, f"{m}.py imports the script(s) {sorted(bad)}: move what it needs to the floor"


def test_no_circles():
    # at module level, and also counting imports inside functions, except quantize.py's command line, which
    # reaches up to the floor that imports its library part
    graph = {m: edges(m, top_only=(m == 'quantize')) for m in MODULES}
    done, path = set(), []

    def walk(m):
        if m in path:
            raise AssertionError('import circle: ' + ' -> '.join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            walk(t)
        path.pop()
        done.add(m)
    for m in MODULES:
        walk(m)


def test_prepare_needs_no_torch():
    closure, todo = set(), ['prepare']
    while todo:
        m = todo.pop()
        closure.add(m)
        todo += [t for t in edges(m, top_only=True) if t not in closure]
    for m in closure:
        tree = ast.parse(open(os.path.join(REPO, m + '.py'), encoding='utf-8').read())
        top = {a.name.split('.')[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names} | \
              {n.module.split('.')[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert 'torch' not in top, f"prepare.py imports {m}.py, which imports torch"


if __name__ == '__main__':
    for m in MODULES:
        for t, top in sorted(GRAPH[m]):
            print(f"{m} -> {t}" + ('' if top else '  (inside a function)'))
    sys.exit(0)
