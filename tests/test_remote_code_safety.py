"""The remote-code surface of a Vedas checkpoint (docs/security.md).

`AutoModel.from_pretrained(folder, trust_remote_code=True)` executes the Python files a checkpoint carries. Those
files (configuration_vedas.py, modeling_vedas.py, routing_vedas.py, replay_vedas.py) must:

* import only torch, transformers, a few pure standard-library modules and each other;
* do no I/O beyond what from_pretrained asks for, make no network calls, start no process;
* contain no eval/exec/compile/__import__/importlib/pickle/marshal/torch.load.

The rules are checked on the files as saved into a checkpoint, by walking their syntax tree (a grep would miss
`from torch import load as f` or `getattr(torch, "load")`, and flag comments). The checkpoint must also point its
`auto_map` only at those files and hold its weights as safetensors only, and loading it must execute only them.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from vedas_trainer.checkpoint import REMOTE_CODE_FILES


BACKBONES = ("qwen2_vl", "qwen2_5_vl")
SIBLINGS = frozenset(Path(name).stem for name in REMOTE_CODE_FILES)

ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
# Standard-library modules that only compute (no files, processes, network or imports by name).
ALLOWED_STDLIB = frozenset({"__future__", "dataclasses", "math", "typing", "warnings"})

# Builtins that run code given as data, import by name, read files or reach other modules' globals.
FORBIDDEN_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "globals",
                                "__builtins__"})
# Modules that give file, process, network, serialisation or import access. Named anywhere in a dotted path that
# starts at an import (`torch.os.system` works: torch imports os), not only in import statements.
FORBIDDEN_MODULES = frozenset({
    "os", "sys", "io", "subprocess", "shutil", "pathlib", "tempfile", "glob", "fileinput", "mmap",
    "socket", "ssl", "urllib", "urllib3", "http", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
    "huggingface_hub", "pickle", "cPickle", "dill", "marshal", "shelve", "importlib", "pkgutil", "runpy", "zipimport",
    "builtins", "ctypes", "cffi", "multiprocessing", "code", "codeop", "pdb",
})  # not "select" or "signal": torch.select and torch.signal are tensor operations
# torch/transformers APIs that read or write files, fetch from the network, load native code or start processes.
FORBIDDEN_APIS = (
    "torch.load", "torch.save", "torch.serialization", "torch.hub", "torch.utils.model_zoo", "torch.package",
    "torch.jit.load", "torch.jit.save", "torch.ops.load_library", "torch.classes.load_library",
    "torch.utils.cpp_extension", "torch.compile",  # compile: generated code and an on-disk cache
    "torch.distributed", "torch.multiprocessing",
    "transformers.utils.hub", "transformers.file_utils", "transformers.dynamic_module_utils",
    "transformers.pipelines", "transformers.trainer",
)
# The collectives on a process group the training launcher already made: data-parallel ranks agree on how many
# latent passes to run (ZeRO-3 would hang otherwise). Nothing here opens a connection or starts a process.
ALLOWED_DISTRIBUTED = frozenset({"torch.distributed.is_available", "torch.distributed.is_initialized",
                                 "torch.distributed.get_world_size", "torch.distributed.all_reduce",
                                 "torch.distributed.ReduceOp.MAX"})
# Functions that download, load code by name or read files, whatever path they are reached by.
FORBIDDEN_NAMES = frozenset({"cached_file", "cached_files", "hf_hub_download", "snapshot_download", "download_url",
                             "get_class_from_dynamic_module", "get_cached_module_file", "load_library"})
# Methods that do file or Hub I/O on whatever object they are called on. `super().from_pretrained(...)` inside an
# overriding classmethod is the I/O from_pretrained asks for and stays allowed.
FORBIDDEN_METHODS = frozenset({"from_pretrained", "save_pretrained", "push_to_hub", "to_json_file",
                               "save_vocabulary", "from_file", "tofile", "read_text", "read_bytes", "write_text",
                               "write_bytes"})
# Attributes that lead from any object to other modules' globals or to the import machinery.
FORBIDDEN_DUNDERS = frozenset({"__globals__", "__builtins__", "__subclasses__", "__code__", "__import__",
                               "__loader__", "__spec__", "f_globals", "f_builtins", "f_back", "gi_frame", "tb_frame"})
ATTRIBUTE_BUILTINS = frozenset({"getattr", "hasattr", "setattr", "delattr", "vars"})


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    construct: str
    reason: str

    def __str__(self):
        return f"{self.file}:{self.line}: `{self.construct}`: {self.reason}"


class RemoteCodeChecker(ast.NodeVisitor):
    """Collects the violations of one remote-code file."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.violations: list[Violation] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted path it was imported as ("F" -> "torch.nn.functional")
        self._inner_attributes: set[int] = set()

    def report(self, node, reason):
        construct = ast.get_source_segment(self.source, node) or type(node).__name__
        construct = " ".join(construct.split())
        construct = construct if len(construct) <= 80 else construct[:77] + "..."
        self.violations.append(Violation(self.name, node.lineno, construct, reason))

    def run(self) -> list[Violation]:
        try:
            tree = ast.parse(self.source, filename=self.name)
        except SyntaxError as err:
            return [Violation(self.name, err.lineno or 0, (err.text or "").strip(), f"does not parse: {err.msg}")]
        # Aliases first (an import inside a function still binds the name for the checks below).
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.bind_aliases(node)
        self.visit(tree)
        return sorted(self.violations, key=lambda v: v.line)

    # ---------------------------------------------------------------------------------------------- imports
    def bind_aliases(self, node):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    self.aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    self.aliases[top] = top
        elif node.level == 0 and node.module:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def visit_Import(self, node):
        for alias in node.names:
            if self.check_imported_module(node, alias.name):
                self.check_dotted(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level == 0:
            if self.check_imported_module(node, node.module):
                for alias in node.names:
                    if alias.name == "*":
                        self.report(node, "star import: the names it binds cannot be checked")
                    else:
                        self.check_dotted(node, f"{node.module}.{alias.name}")
            return
        # Relative imports resolve inside the checkpoint's own folder: only the sibling remote-code files.
        targets = [node.module] if node.module else [alias.name for alias in node.names]
        if node.level > 1:
            self.report(node, "relative import above the checkpoint folder")
        for target in targets:
            if target not in SIBLINGS:
                self.report(node, f"relative import of {target!r}, which is not one of the remote-code files "
                                  f"{sorted(SIBLINGS)}")

    def check_imported_module(self, node, module) -> bool:
        """Reports an import of a module outside the allowed ones; True if the import is allowed."""
        top = module.split(".")[0]
        if top in SIBLINGS:
            self.report(node, f"absolute import of the sibling {top!r}: it would import whatever `{top}` is on "
                              f"sys.path, not the checkpoint's file; use a relative import")
            return False
        if top not in ALLOWED_PACKAGES | ALLOWED_STDLIB:
            self.report(node, f"imports {top!r}; remote code may import only torch, transformers, "
                              f"{', '.join(sorted(ALLOWED_STDLIB))} and its sibling files")
            return False
        return True

    # ----------------------------------------------------------------------------------- names and attributes
    def check_dotted(self, node, dotted: str):
        """Checks a dotted path that starts at an imported module, e.g. `torch.hub.load` or `torch.os.system`."""
        parts = dotted.split(".")
        if forbidden := [p for p in parts if p in FORBIDDEN_MODULES]:
            self.report(node, f"reaches the module {forbidden[0]!r} (file, process, network or import access)")
        elif dotted in ALLOWED_DISTRIBUTED:  # whole chains only: a bare `torch.distributed` stays forbidden
            return
        elif api := next((a for a in FORBIDDEN_APIS if dotted == a or dotted.startswith(a + ".")), None):
            self.report(node, f"uses {api} (file I/O, network, native code or processes)")
        elif parts[-1] in FORBIDDEN_NAMES:
            self.report(node, f"calls {parts[-1]} (downloads or loads code)")

    def dotted_name(self, node) -> str | None:
        """`a.b.c` as the dotted path of what `a` was imported as, or None if the chain does not start at an import."""
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.aliases:
            return ".".join([self.aliases[node.id], *reversed(attrs)])
        return None

    def visit_Name(self, node):
        if node.id in FORBIDDEN_BUILTINS:
            self.report(node, f"uses the builtin {node.id} (runs code from data, imports by name, opens files or "
                              f"reaches module globals)")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in FORBIDDEN_DUNDERS:
            self.report(node, f"accesses {node.attr}, a way to other modules' globals or the import machinery")
        elif node.attr in FORBIDDEN_METHODS and not _is_super_call(node.value):
            self.report(node, f"calls .{node.attr}(), which does file or Hub I/O")
        # Check each chain once, from its outermost attribute (`torch.hub.load`, not also `torch.hub`).
        if id(node) not in self._inner_attributes:
            inner = node.value
            while isinstance(inner, ast.Attribute):
                self._inner_attributes.add(id(inner))
                inner = inner.value
            if (dotted := self.dotted_name(node)) is not None:
                self.check_dotted(node, dotted)
        self.generic_visit(node)

    def visit_Call(self, node):
        """getattr(x, "name") and friends: the attribute rules apply to names given as strings too."""
        func = node.func
        if isinstance(func, ast.Name) and func.id in ATTRIBUTE_BUILTINS and node.args:
            module = self.dotted_name(node.args[0])
            name = node.args[1] if len(node.args) > 1 else None
            literal = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
            if literal in FORBIDDEN_METHODS | FORBIDDEN_DUNDERS:
                self.report(node, f"looks up {literal!r} by name")
            elif module is not None and literal is not None:
                self.check_dotted(node, f"{module}.{literal}")
            elif module is not None:  # getattr(torch, name), vars(torch): anything in the module is reachable
                self.report(node, f"{func.id}() on the module {module!r} without a literal attribute name: what it "
                                  f"reaches cannot be checked")
        self.generic_visit(node)


def _is_super_call(node) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def check_remote_code(path) -> list[Violation]:
    path = Path(path)
    return RemoteCodeChecker(path.name, path.read_text(encoding="utf-8")).run()


def _format(violations) -> str:
    return "\n".join(f"  {v}" for v in violations)


# -------------------------------------------------------------------------------------------- the saved checkpoint
@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpoint_carries_exactly_the_remote_code_files(backbone, vedas_dirs):
    folder = vedas_dirs[backbone]
    code = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".py", ".pyc", ".so", ".pyd"))
    assert code == sorted(REMOTE_CODE_FILES)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_saved_remote_code_follows_the_surface_rules(backbone, vedas_dirs):
    violations = [v for name in REMOTE_CODE_FILES for v in check_remote_code(vedas_dirs[backbone] / name)]
    assert not violations, "the checkpoint's remote code breaks the rules of docs/security.md:\n" + _format(violations)


def _auto_map_references(value, where):
    """(where, reference) for every class reference of an auto_map (tokenizer entries are [slow, fast] lists)."""
    for key, refs in value.items():
        for ref in refs if isinstance(refs, (list, tuple)) else [refs]:
            if ref is not None:
                yield f"{where}[{key!r}]", ref


def _find_auto_maps(data, where):
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "auto_map" and isinstance(value, dict):
                yield from _auto_map_references(value, f"{where} auto_map")
            else:
                yield from _find_auto_maps(value, where)
    elif isinstance(data, list):
        for item in data:
            yield from _find_auto_maps(item, where)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_auto_map_points_only_at_the_remote_code_files(backbone, vedas_dirs):
    folder = vedas_dirs[backbone]
    references = [ref for path in sorted(folder.glob("*.json"))
                  for ref in _find_auto_maps(json.loads(path.read_text()), path.name)]
    config_keys = {where for where, _ in references if where.startswith("config.json")}
    assert {"config.json auto_map['AutoConfig']", "config.json auto_map['AutoModel']",
            "config.json auto_map['AutoModelForImageTextToText']"} <= config_keys
    for where, ref in references:
        # "org/repo--module.Class" would make transformers fetch code from another Hub repository
        assert "--" not in ref, f"{where} = {ref!r} points at another repository"
        module, _, class_name = ref.rpartition(".")
        assert module in SIBLINGS and class_name.isidentifier(), f"{where} = {ref!r} is not in {sorted(SIBLINGS)}"
        source = (folder / f"{module}.py").read_text()
        assert f"class {class_name}(" in source, f"{where} = {ref!r}: no such class in {module}.py"


# Formats that unpickle (and so can run code) when loaded: torch's zip and legacy formats, plain pickles, numpy.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".h5", ".msgpack")
SAFE_SUFFIXES = {".json", ".safetensors", ".py", ".md", ".jinja", ".txt"}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_weights_are_safetensors_only(backbone, vedas_dirs):
    folder = vedas_dirs[backbone]
    files = [p for p in folder.rglob("*") if p.is_file()]
    unexpected = [str(p.relative_to(folder)) for p in files if p.suffix not in SAFE_SUFFIXES]
    assert not unexpected, f"files of unexpected kinds in the checkpoint: {unexpected}"
    assert not [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    for path in files:  # a pickle or torch zip archive under another name is still refused
        head = path.read_bytes()[:4]
        assert not head.startswith(b"PK\x03\x04"), f"{path.name} is a zip archive (torch.save format)"
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{path.name} is a pickle"
    weights = sorted(p.name for p in files if p.suffix == ".safetensors")
    assert weights == ["model.safetensors"] or "model.safetensors.index.json" in {p.name for p in files}
    with safe_open(str(folder / weights[0]), framework="pt") as handle:
        assert any(key.endswith("depth_router.weight") or ".depth_router." in key for key in handle.keys())


# ---------------------------------------------------------------------------------- what loading really executes
LOAD_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    from transformers import AutoModel, AutoProcessor

    folder = sys.argv[1]
    executed, events = set(), []

    def audit(event, args):
        # "exec" carries the code object of every module body run by an import (and of exec() calls)
        if event == "exec":
            executed.add(getattr(args[0], "co_filename", repr(args[0])))
        elif event == "open":
            path, mode, flags = args
            events.append(["open", str(path), mode, flags])
        elif event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                               "os.fork", "pickle.", "ctypes.", "urllib.", "http.")):
            events.append([event, repr(args)[:200]])

    sys.addaudithook(audit)
    before = set(sys.modules)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    modules = {name: getattr(sys.modules[name], "__file__", None) for name in set(sys.modules) - before
               if name.startswith("transformers_modules")}
    print(json.dumps({"model_module": type(model).__module__, "modules": modules, "executed": sorted(executed),
                      "events": events}))
    """
)


def _python_installation():
    import site
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()}
    roots |= {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return [os.path.realpath(root) for root in roots if root]


def _is_under(path, roots) -> bool:
    path = os.path.realpath(path)
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def load_under_audit(folder, cache, cwd) -> dict:
    """Loads `folder` with trust_remote_code in a fresh process with its own modules cache, under an audit hook."""
    env = {**os.environ, "HF_MODULES_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def loading_problems(report, folder, cache) -> list[str]:
    """What the audited load did beyond running the saved remote-code files and what from_pretrained asks for."""
    folder, cache, remote = Path(folder), Path(cache), set(REMOTE_CODE_FILES)
    problems = []
    # sys.modules gained the remote-code files (and the packages transformers makes around them), all from the cache
    loaded = {Path(file).name for file in report["modules"].values() if not file.endswith("__init__.py")}
    if loaded != remote:
        problems.append(f"modules imported from the checkpoint: {sorted(loaded)}, expected {sorted(remote)}")
    problems += [f"{name} imported from {file}, outside the modules cache"
                 for name, file in report["modules"].items() if not _is_under(file, [str(cache)])]
    # the cache holds byte-identical copies of the saved (and statically checked) files, nothing else that runs
    for path in sorted(cache.rglob("*.py")):
        if path.name == "__init__.py":
            if path.read_text().strip():
                problems.append(f"{path} is not empty")
        elif path.name not in remote:
            problems.append(f"{path.name} was copied into the modules cache but is not a remote-code file")
        elif path.read_bytes() != (folder / path.name).read_bytes():
            problems.append(f"{path} differs from the saved {path.name}")
    # Code run: from the Python installation, the cached remote code, or "<string>" (the methods dataclasses
    # generates with exec; remote code cannot call exec itself, see the static rules).
    installation = _python_installation()
    problems += [f"code run from {file}, outside the Python installation and the remote code"
                 for file in report["executed"] if file != "<string>" and not _is_under(file, installation)
                 and not (_is_under(file, [str(cache)]) and Path(file).name in remote | {"__init__.py"})]
    events = report["events"]
    problems += [f"{event[0]} while loading: {event[1]}" for event in events if event[0] != "open"]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    opens = [e for e in events if e[0] == "open"]
    writes = [e for e in opens if (e[2] and set(str(e[2])) & set("wax+")) or (e[3] or 0) & write_flags]
    problems += [f"wrote {e[1]}, outside the modules cache" for e in writes if not _is_under(e[1], [str(cache)])]
    readable = [str(folder), str(cache), *installation, "/proc", "/sys", "/dev"]
    problems += [f"read {e[1]}, outside the checkpoint, the modules cache and Python"
                 for e in opens if e not in writes and not _is_under(e[1], readable)]
    return problems


@pytest.mark.parametrize("backbone", BACKBONES)
def test_loading_executes_only_the_remote_code_files(backbone, vedas_dirs, tmp_path):
    """`AutoModel`/`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` in a fresh process: the only code
    run from outside the Python installation is the cached copy of the four files, nothing is written outside the
    modules cache, nothing is read outside the checkpoint, no socket is opened and no process started."""
    folder, cache = vedas_dirs[backbone], tmp_path / "modules"
    report = load_under_audit(folder, cache, tmp_path)
    assert report["model_module"].startswith("transformers_modules.") and report["model_module"].endswith(
        ".modeling_vedas")
    problems = loading_problems(report, folder, cache)
    assert not problems, "loading the checkpoint did more than expected:\n" + "\n".join(problems)


# Runs when configuration_vedas is imported. The helper module also gets executed, as a sibling would.
PLANTED_AT_IMPORT = """

from .helper_vedas import VALUE as _VALUE
import subprocess as _subprocess
_subprocess.run(["true"])
with open(__file__ + ".log", "w") as _log:
    _log.write("loaded")
try:
    import socket as _socket
    _socket.create_connection(("127.0.0.1", 9), timeout=1)
except OSError:
    pass
"""


def test_audited_load_reports_what_a_planted_module_does(vedas_dirs, tmp_path):
    """The audit can fail: a copy of the checkpoint whose configuration file imports an extra file, starts a
    process, writes next to itself in the checkpoint folder and opens a socket."""
    folder, cache = tmp_path / "planted", tmp_path / "modules"
    shutil.copytree(vedas_dirs["qwen2_vl"], folder)
    with open(folder / "configuration_vedas.py", "a") as handle:
        handle.write(PLANTED_AT_IMPORT.replace('__file__ + ".log"', repr(str(folder / "written.log"))))
    (folder / "helper_vedas.py").write_text("VALUE = 1\n")
    problems = "\n".join(loading_problems(load_under_audit(folder, cache, tmp_path), folder, cache))
    assert "helper_vedas.py was copied into the modules cache" in problems
    assert "code run from" in problems and "helper_vedas.py" in problems
    assert "differs from the saved configuration_vedas.py" not in problems  # the copy is the planted file itself
    assert "subprocess.Popen while loading" in problems
    assert f"wrote {folder / 'written.log'}" in problems
    assert "socket.connect while loading" in problems


# ------------------------------------------------------------------------------------- the checker can say no
PLANTED = [
    ("import os", "imports 'os'"),
    ("import subprocess as sp", "imports 'subprocess'"),
    ("from pathlib import Path", "imports 'pathlib'"),
    ("import requests", "imports 'requests'"),
    ("from huggingface_hub import hf_hub_download", "imports 'huggingface_hub'"),
    ("import importlib", "imports 'importlib'"),
    ("import pickle", "imports 'pickle'"),
    ("from torch import load as restore", "torch.load"),
    ("state = torch.load('weights.pt')", "torch.load"),
    ("model = torch.hub.load('org/repo', 'net')", "torch.hub"),
    ("torch.distributed.init_process_group('gloo')", "torch.distributed"),
    ("group = torch.distributed", "torch.distributed"),
    ("torch.distributed.broadcast(tensor, 0)", "torch.distributed"),
    ("weights = torch.from_file('weights.raw', size=4)", ".from_file()"),
    ("torch.os.system('true')", "module 'os'"),
    ("fn = getattr(torch, 'load')", "torch.load"),
    ("fn = getattr(torch, name)", "without a literal attribute name"),
    ("fn = getattr(self.model, 'save_pretrained')", "looks up 'save_pretrained' by name"),
    ("from transformers.utils import cached_file", "cached_file"),
    ("from transformers.dynamic_module_utils import get_class_from_dynamic_module", "dynamic_module_utils"),
    ("value = eval('1 + 1')", "builtin eval"),
    ("exec('x = 1')", "builtin exec"),
    ("code = compile('1', 'f', 'eval')", "builtin compile"),
    ("mod = __import__('os')", "builtin __import__"),
    ("text = open('/etc/passwd').read()", "builtin open"),
    ("g = (lambda: 0).__globals__", "__globals__"),
    ("vision = VedasConfig.from_pretrained('org/other-repo')", ".from_pretrained()"),
    ("from .not_a_remote_file import helper", "'not_a_remote_file'"),
    ("from ..outside import helper", "above the checkpoint folder"),
    ("from modeling_vedas import VedasMixin", "absolute import of the sibling"),
    ("from torch import *", "star import"),
]


@pytest.mark.parametrize("snippet,expected", PLANTED, ids=[snippet for snippet, _ in PLANTED])
def test_checker_reports_a_planted_violation(snippet, expected, vedas_dirs, tmp_path):
    """A copy of the saved modeling file with one bad line appended: exactly that line is reported, by file name
    and line number, with the construct quoted."""
    saved = (vedas_dirs["qwen2_vl"] / "modeling_vedas.py").read_text()
    bad = tmp_path / "modeling_vedas.py"
    bad.write_text(saved.rstrip("\n") + "\n\n" + snippet + "\n")
    line = len(saved.rstrip("\n").splitlines()) + 2
    violations = check_remote_code(bad)
    assert violations and all(v.line == line for v in violations), _format(violations)
    assert any(expected in str(v) for v in violations), _format(violations)
    for violation in violations:  # "modeling_vedas.py:<line>: `<the construct, quoted from the line>`: why"
        assert str(violation).startswith(f"modeling_vedas.py:{line}: `{violation.construct}`: ")
        assert violation.construct in snippet


def test_checker_allows_super_from_pretrained_and_relative_sibling_imports(tmp_path):
    good = tmp_path / "configuration_vedas.py"
    good.write_text(textwrap.dedent(
        """
        import math
        import torch.nn.functional as F
        from transformers import Qwen2VLConfig
        from .routing_vedas import VedasCache
        from . import replay_vedas


        class C(Qwen2VLConfig):
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                return super().from_pretrained(*args, **kwargs)

            def f(self, x):
                return F.pad(x, (1, 1)) * math.pi + getattr(self, "scale")
        """
    ))
    assert check_remote_code(good) == []
