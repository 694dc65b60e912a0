"""Mutation testing of the rules that keep the network honest (issue 17).

    python bench/mutation.py                          # every target below
    python bench/mutation.py --paths protocols/signing.py protocols/receipt.py
    python bench/mutation.py --paths peer/            # the peer/ check functions only
    python bench/mutation.py --report                 # re-read the last run, write the JSON
    python bench/mutation.py --paths protocols/signing.py --survivors   # retest survivors only

mutmut 3 breaks one thing at a time in a copy of the tree (``mutants/``) and
runs, for each mutant, the tests that call the mutated function (it records
which in a first, traced run of the selected tests). A mutant that no test
fails on is a rule no test holds.

This runner:

- maps each module to the tests that cover it (``TARGETS``): protocols/ is
  held by tests/unit; the check functions in peer/ by the unit, integration
  and chaos tests that drive them (only those functions are mutated: globs);
- runs one mutmut per group in its own work dir (``build/mutation/<group>``,
  a copy of the tree with the group's ``[tool.mutmut]``), niced, with
  ``--workers`` mutants at a time (2: this is a shared 2-core box);
- runs hypothesis derandomized with fewer examples (``--hypothesis-examples``)
  so a mutant's verdict does not depend on luck and survivors cost less;
- lets mypy (strict on protocols/, as in CI) catch mutants first: a mutant
  that cannot type-check could never land;
- writes ``bench/results/mutation.json``: the score per module, the commit
  measured, every survivor with its diff. Modules not in this run keep their
  last figures (each with its own commit).

Equivalent mutants (no test can tell them apart from the original) are listed
in pyproject.toml under ``[tool.edgeswarm.mutation] equivalent``, each with the
mutated line it expects (so an entry goes stale, and the mutant counts again,
when the code moves) and a one-line reason. Lines that only build error or log
text are not mutated at all (``do_not_mutate_patterns`` in ``[tool.mutmut]``):
a ProtocolError's type is the contract, its words are not.

Not part of .ci/run (it takes tens of minutes); run it before resolving an
issue that adds a rule, and state the score. docs/testing.md has the figures.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "mutation.json"
WORK = ROOT / "build" / "mutation"
COPY = ["protocols", "edge_models", "peer", "bootstrap", "tests", "pyproject.toml"]
PLUGIN = "mutation_hypothesis"


@dataclass(frozen=True)
class Target:
    """One module to mutate, the tests that cover it, and (peer/) the functions to mutate."""

    path: str
    group: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # mutmut names without the module, e.g. "x_check_outputs"


UNIT = ("tests/unit",)
_PROTOCOLS = sorted(
    p.stem for p in (ROOT / "protocols").glob("*.py") if p.stem not in ("__init__", "errors")
)
# Money, signatures, untrusted input: run these first.
PRIORITY = [
    "protocols/signing.py",
    "protocols/signed.py",
    "protocols/certificate.py",
    "protocols/receipt.py",
    "protocols/payment.py",
    "protocols/witness.py",
    "protocols/proofs.py",
    "protocols/ad.py",
    "protocols/verification.py",
    "protocols/ledger_state.py",
    "protocols/tensor.py",
    "protocols/codec.py",
]

MARKET_IT = ("tests/integration/test_output_mismatch.py",)  # 3 real-host tests, ~25 s
TARGETS: list[Target] = [
    *(Target(f"protocols/{m}.py", "protocols", UNIT) for m in _PROTOCOLS),
    # Outputs decode within limits and match the declared outputs (the digest checks moved to
    # protocols/requester.py with the market split: held by tests/integration/test_output_mismatch).
    Target(
        "peer/market/requester.py",
        "peer",
        (
            "tests/unit/test_rules_requester_outputs.py",
            "tests/unit/test_market_flow.py",
            *MARKET_IT,
        ),
        ("x_check_outputs", "x_declared_problem"),
    ),
    # Gossip intake: signature, signer = origin, topic, duplicates, rate.
    Target(
        "peer/market/gossip.py",
        "peer",
        ("tests/unit/test_market_gossip_guard.py", "tests/unit/test_rules_market_gossip.py"),
        ("x_parse_market_message", "xǁGossipGuardǁ*"),
    ),
    # Ad acceptance in the DHT.
    Target(
        "peer/discovery.py",
        "peer",
        ("tests/unit/test_ad.py", "tests/integration/test_peer_network.py"),
        ("xǁAdValidatorǁ*",),
    ),
    # Per-peer stream caps and rate budgets (one peer never makes another hold unbounded work).
    Target(
        "peer/caps.py",
        "peer",
        ("tests/unit/test_caps_intake.py", "tests/integration/test_caps.py"),
        ("xǁStreamCapsǁtry_open", "xǁStreamCapsǁ_release", "xǁRateBudgetǁ*"),
    ),
    # Ledger ingestion of untrusted fact bytes.
    Target(
        "peer/ledger_store.py",
        "peer",
        (
            "tests/integration/test_ledger_store.py",
            "tests/chaos/test_ledger_fuzz.py",
        ),
        ("x_parse_fact", "x__parse_untrusted", "x_ingest_parsed", "x__receipt_from"),
    ),
]

SOURCE_PATHS = {"protocols": ["protocols/"], "peer": ["peer/"]}

CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
MISSED = {"survived", "no tests", "suspicious"}


# --- configuration ----------------------------------------------------------------


def load_pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def base_config(py: dict[str, Any]) -> dict[str, Any]:
    return dict(py.get("tool", {}).get("mutmut", {}))


def equivalents(py: dict[str, Any]) -> list[dict[str, str]]:
    return list(py.get("tool", {}).get("edgeswarm", {}).get("mutation", {}).get("equivalent", []))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_work_pyproject(work: Path, cfg: dict[str, Any]) -> None:
    """The repo's pyproject.toml with its ``[tool.mutmut]`` table replaced by ``cfg``."""
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("["):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            out.append(line)
    out += ["", "[tool.mutmut]"] + [f"{k} = {toml_value(v)}" for k, v in cfg.items()]
    (work / "pyproject.toml").write_text("\n".join(out) + "\n")


def plugin_source(examples: int) -> str:
    return (
        '"""Written by bench/mutation.py: derandomized hypothesis for mutation runs."""\n'
        "from hypothesis import HealthCheck, settings\n\n"
        "settings.register_profile(\n"
        f'    "mutation", max_examples={examples}, derandomize=True, database=None,\n'
        "    deadline=None, suppress_health_check=list(HealthCheck),\n"
        ")\n"
        'settings.load_profile("mutation")\n'
        "\n\n"
        "def pytest_sessionstart(session):\n"
        "    # Every mutant runs in a process forked after the traced run: caches that run\n"
        "    # filled (verified signatures, peer ids) would skip the mutated code. Empty them.\n"
        "    import sys\n"
        "    for name, mod in list(sys.modules.items()):\n"
        '        if not name.startswith(("protocols.", "peer.")):\n'
        "            continue\n"
        "        for value in list(vars(mod).values()):\n"
        '            if callable(getattr(value, "cache_clear", None)):\n'
        "                value.cache_clear()\n"
        '        if isinstance(getattr(mod, "_verified", None), dict):\n'
        "            mod._verified.clear()\n"
    )


@dataclass
class Group:
    name: str
    targets: list[Target] = field(default_factory=list)
    only_tests: list[str] = field(default_factory=list)  # --only-tests: a narrower selection
    suffix: str = ""

    @property
    def work(self) -> Path:
        return WORK / (self.name + self.suffix)

    def tests(self) -> list[str]:
        if self.only_tests:
            return list(self.only_tests)
        seen: dict[str, None] = {}
        for t in self.targets:
            for x in t.tests:
                seen[x] = None
        return list(seen)

    def globs(self) -> list[str]:
        """mutmut name globs for the functions to mutate ([] = every mutant of the files)."""
        if all(not t.functions for t in self.targets):
            return []
        out = []
        for t in self.targets:
            mod = t.path.removesuffix(".py").replace("/", ".")
            out += [f"{mod}.{f}__mutmut_*" for f in t.functions] or [f"{mod}.*"]
        return out

    def mutmut_config(self, base: dict[str, Any], examples: int) -> dict[str, Any]:
        cfg = dict(base)
        cfg["source_paths"] = SOURCE_PATHS[self.name]
        cfg["only_mutate"] = [t.path for t in self.targets]
        others = [p + "/" for p in ("protocols", "edge_models", "peer", "bootstrap")]
        cfg["also_copy"] = [p for p in others if p not in cfg["source_paths"]] + [f"{PLUGIN}.py"]
        cfg["pytest_add_cli_args_test_selection"] = self.tests()
        cfg["pytest_add_cli_args"] = [
            *base.get("pytest_add_cli_args", []),
            "-p",
            PLUGIN,
        ]
        if self.name != "protocols":
            cfg.pop("type_check_command", None)  # mypy is strict on protocols/ only
        return cfg


def select(paths: list[str]) -> list[Group]:
    chosen: list[Target] = []
    for t in TARGETS:
        if not paths or any(t.path == p or t.path.startswith(p.rstrip("/") + "/") for p in paths):
            chosen.append(t)
    unknown = [p for p in paths if not any(t.path.startswith(p.rstrip("/")) for t in TARGETS)]
    if unknown:
        raise SystemExit(f"no mutation target under {unknown}; see TARGETS in {__file__}")
    groups: dict[str, Group] = {}
    for t in chosen:
        groups.setdefault(t.group, Group(t.group)).targets.append(t)
    return list(groups.values())


# --- running ----------------------------------------------------------------------


def prepare(
    group: Group, cfg: dict[str, Any], examples: int, fresh: bool, add_tests: list[str]
) -> None:
    """A fresh work dir (a copy of the tree); for survivor reruns, the old copy plus the test
    files ``add_tests`` (new tests that kill survivors; the rest of tests/ stays as measured,
    since tests written for newer sources may not import against the mutated ones)."""
    work = group.work
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    for name in COPY if fresh else []:
        src, dst = ROOT / name, work / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
    for rel in [] if fresh else add_tests:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, work / rel)
    (work / f"{PLUGIN}.py").write_text(plugin_source(examples))
    write_work_pyproject(work, cfg)  # mutmut copies tests/, pyproject and the plugin on
    if fresh:  # what was mutated: --report and survivor reruns keep saying so
        (work / "measured.json").write_text(
            json.dumps(
                {
                    "commit": git("rev-parse", "HEAD"),
                    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )


def run_mutmut(group: Group, workers: int, names: list[str], nice: int) -> float:
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["nice", "-n", str(nice), str(bindir / "mutmut"), "run", "--max-children", str(workers)]
    cmd += names
    log_path = group.work / "mutmut.log"
    print(f"[{group.name}] {' '.join(cmd[:7])} ... ({len(names)} names) -> {log_path}", flush=True)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        rc = subprocess.call(cmd, cwd=group.work, env=env, stdout=log, stderr=subprocess.STDOUT)
    took = time.monotonic() - t0
    if rc != 0:
        tail = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        raise SystemExit(f"[{group.name}] mutmut exited {rc}:\n" + "\n".join(tail))
    return took


# --- results ----------------------------------------------------------------------


def read_results(group: Group) -> dict[str, dict[str, Any]]:
    """mutant name -> {module, status}; only the group's targets (and function globs)."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, dict[str, Any]] = {}
    globs = group.globs()
    for t in group.targets:
        meta = group.work / "mutants" / (t.path + ".meta")
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            if globs and not any(fnmatch.fnmatchcase(name, g) for g in globs):
                continue
            out[name] = {"module": t.path, "status": status_by_exit_code[code]}
    return out


def diff_of(group: Group, name: str) -> str:
    """The mutant's diff (mutmut's own), read from the group's work dir."""
    from mutmut import configuration
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    why = ""
    for _ in range(3):  # mutmut may be rewriting its index while a run is in progress
        try:
            os.chdir(group.work)
            configuration.reset_config()
            return get_diff_for_mutant(name)
        except Exception as exc:  # a stale work dir: say so rather than stop the report
            why = str(exc)
            time.sleep(0.5)
        finally:
            os.chdir(here)
            configuration.reset_config()
    return f"(no diff: {why})"


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and ln[1:2] != "-"]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+"]
    return minus, plus


def match_equivalent(name: str, diff: str, table: list[dict[str, str]]) -> dict[str, str] | None:
    _, plus = changed_lines(diff)
    for e in table:
        if e.get("mutant") == name and e.get("line", "").strip() in plus:
            return e
    return None


# --- message-only mutants -----------------------------------------------------------
#
# Validators take the message's kind and field name only to say what is wrong
# (``want_bytes("Transfer", "payer", value, lo=1, hi=64)``). A mutant that only changes
# such a string changes an error's words, never what is accepted. Which parameters are
# like that is computed, not listed: a parameter is message-only when every use of it
# in its function is inside an f-string, a ``raise`` or an argument to another
# message-only parameter.


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _arg_param(call: ast.Call, node: ast.AST, defs: dict[str, list[list[str]]]) -> list[str]:
    """The parameter name(s) ``node`` binds to in ``call`` (one per def of that name)."""
    name = _callee(call)
    out = []
    for params in defs.get(name or "", []):
        skip = (
            1 if params[:1] in (["self"], ["cls"]) and isinstance(call.func, ast.Attribute) else 0
        )
        for i, arg in enumerate(call.args):
            if arg is node and i + skip < len(params):
                out.append(params[i + skip])
        for kw in call.keywords:
            if kw.value is node and kw.arg is not None:
                out.append(kw.arg)
    return out


def message_params(files: list[Path]) -> dict[str, set[str]]:
    """function name -> its message-only parameters (across ``files``; a name defined twice
    keeps only what is message-only in every definition)."""
    fns: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for f in files:
        tree = ast.parse(f.read_text())
        fns += [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    defs: dict[str, list[list[str]]] = {}
    for fn in fns:
        defs.setdefault(fn.name, []).append(_params(fn))
    parents: dict[ast.AST, ast.AST] = {}
    for fn in fns:
        for parent in ast.walk(fn):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
    msg: dict[int, set[str]] = {id(fn): set() for fn in fns}
    for _ in range(10):  # to a fixpoint (helpers pass kind/name on to helpers)
        changed = False
        known = {n: set.intersection(*[msg[id(f)] for f in fns if f.name == n]) for n in defs}
        for fn in fns:
            for p in _params(fn):
                if p in msg[id(fn)] or p in ("self", "cls"):
                    continue
                uses = [
                    n
                    for n in ast.walk(fn)
                    if isinstance(n, ast.Name) and n.id == p and isinstance(n.ctx, ast.Load)
                ]
                if uses and all(_only_text(u, parents, defs, known) for u in uses):
                    msg[id(fn)].add(p)
                    changed = True
        if not changed:
            break
    return {n: set.intersection(*[msg[id(f)] for f in fns if f.name == n]) for n in defs}


def _only_text(
    node: ast.AST,
    parents: dict[ast.AST, ast.AST],
    defs: dict[str, list[list[str]]],
    known: dict[str, set[str]],
) -> bool:
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.keyword):  # f(kind=kind): the call binds the value
            parent = parents.get(parent)
            continue
        if isinstance(parent, ast.JoinedStr | ast.Raise):
            return True
        if isinstance(parent, ast.Call) and child is not parent.func:
            bound = _arg_param(parent, child, defs)
            return bool(bound) and all(b in known.get(_callee(parent) or "", set()) for b in bound)
        if isinstance(parent, ast.stmt):
            return False
        child, parent = parent, parents.get(parent)
    return False


def _function_pair(group: Group, name: str, path: str) -> tuple[str, str] | None:
    import libcst as cst
    from mutmut.mutation.diff_apply import (
        read_functions_from_index,
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )

    here = Path.cwd()
    try:
        os.chdir(group.work)
        fns = read_functions_from_index(name, path)
        if fns is None:
            module = read_mutants_module(path)
            fns = (read_original_function(module, name), read_mutant_function(module, name))
        return cst.Module([fns[0]]).code, cst.Module([fns[1]]).code
    except Exception:
        return None
    finally:
        os.chdir(here)


def message_only(orig: str, mutant: str, params: dict[str, set[str]]) -> str | None:
    """Why the mutant only changes error text, or None."""
    a, b = ast.parse(orig), ast.parse(mutant)
    na, nb = list(ast.walk(a)), list(ast.walk(b))
    if len(na) != len(nb):
        return None
    diff = [
        (x, y)
        for x, y in zip(na, nb, strict=True)
        if type(x) is not type(y)
        or (isinstance(x, ast.Constant) and (type(x.value), x.value) != (type(y.value), y.value))
        or (isinstance(x, ast.keyword) and x.arg != y.arg)
        or (isinstance(x, ast.Name) and x.id != y.id)
        or (isinstance(x, ast.Attribute) and x.attr != y.attr)
        or (
            isinstance(x, ast.operator | ast.cmpop | ast.boolop | ast.unaryop)
            and type(x) is not type(y)
        )
    ]
    if len(diff) != 1:
        return None
    x, _ = diff[0]
    if not (isinstance(x, ast.Constant) and isinstance(x.value, str)):
        return None
    parents = {c: p for p in ast.walk(a) for c in ast.iter_child_nodes(p)}
    call = parents.get(x)
    if isinstance(call, ast.keyword):
        call = parents.get(call)
    if not isinstance(call, ast.Call):
        return None
    for fname, msg in params.items():
        if _callee(call) != fname:
            continue
        bound = _arg_param(call, x, _DEFS)
        if bound and all(b in msg for b in bound):
            return f"only error text: argument {bound[0]!r} of {fname}() is used in messages only"
    return None


_DEFS: dict[str, list[list[str]]] = {}


def load_defs(files: list[Path]) -> dict[str, set[str]]:
    _DEFS.clear()
    for f in files:
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                _DEFS.setdefault(n.name, []).append(_params(n))
    return message_params(files)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def summarize(
    groups: list[Group], table: list[dict[str, str]], meta: dict[str, Any], text_rule: bool
) -> dict[str, Any]:
    sources = sorted((ROOT / "protocols").glob("*.py")) + [
        ROOT / t.path for g in groups for t in g.targets if t.path.startswith("peer/")
    ]
    params = load_defs(sources)
    previous: dict[str, Any] = {}
    if RESULTS.exists():
        try:
            previous = json.loads(RESULTS.read_text())
        except json.JSONDecodeError:
            previous = {}
    modules: dict[str, Any] = dict(previous.get("modules", {}))
    survivors = [s for s in previous.get("survivors", []) if not _in(s["module"], groups)]
    equivalent = [s for s in previous.get("equivalent", []) if not _in(s["module"], groups)]
    used: set[str] = set()
    for group in groups:
        results = read_results(group)
        measured = group.work / "measured.json"
        source = json.loads(measured.read_text()) if measured.exists() else meta
        per: dict[str, Counter[str]] = {t.path: Counter() for t in group.targets}
        for name, r in sorted(results.items()):
            status = r["status"]
            if status in MISSED:
                diff = diff_of(group, name)
                eq = match_equivalent(name, diff, table)
                pair = _function_pair(group, name, r["module"]) if eq is None else None
                why = message_only(*pair, params) if pair and text_rule else None
                if eq is not None:
                    used.add(name)
                    why = eq["why"]
                if why is not None:
                    status = "equivalent"
                    equivalent.append({"mutant": name, "module": r["module"], "why": why})
                else:
                    survivors.append(
                        {"mutant": name, "module": r["module"], "status": status, "diff": diff}
                    )
            per[r["module"]][status] += 1
        for path, c in per.items():
            if not c:
                continue
            caught = sum(c[s] for s in CAUGHT)
            missed = sum(c[s] for s in MISSED)
            tested = c["killed"] + c["timeout"] + missed
            modules[path] = {
                "mutants": sum(c.values()),
                "killed": c["killed"],
                "timeout": c["timeout"],
                "type_check": c["caught by type check"],
                "survived": c["survived"],
                "no_tests": c["no tests"],
                "suspicious": c["suspicious"],
                "equivalent": c["equivalent"],
                "not_checked": c["not checked"] + c["skipped"],
                "score": round(100.0 * caught / (caught + missed), 1) if caught + missed else None,
                # Without mypy's share: how much the tests alone hold.
                "score_tests_only": (
                    round(100.0 * (c["killed"] + c["timeout"]) / tested, 1) if tested else None
                ),
                "commit": source["commit"],
                "measured": source["date"],
                "tests": group.tests(),
            }
    stale = [
        e
        for e in table
        if e.get("mutant") not in used and any(_in_path(e.get("mutant", ""), g) for g in groups)
    ]
    totals: dict[str, Any] = {}
    for prefix in ("protocols/", "peer/"):
        rows = [m for p, m in modules.items() if p.startswith(prefix)]
        caught = sum(m["killed"] + m["timeout"] + m["type_check"] for m in rows)
        missed = sum(m["survived"] + m["no_tests"] + m["suspicious"] for m in rows)
        totals[prefix] = {
            "modules": len(rows),
            "mutants": sum(m["mutants"] for m in rows),
            "caught": caught,
            "missed": missed,
            "equivalent": sum(m["equivalent"] for m in rows),
            "score": round(100.0 * caught / (caught + missed), 1) if caught + missed else None,
        }
    return {
        **{k: v for k, v in previous.items() if k not in ("modules", "survivors", "equivalent")},
        "last_run": meta,
        "totals": totals,
        "modules": dict(sorted(modules.items())),
        "survivors": sorted(survivors, key=lambda s: s["mutant"]),
        "equivalent": sorted(equivalent, key=lambda s: s["mutant"]),
        "stale_equivalents": stale,
    }


def _in(module: str, groups: list[Group]) -> bool:
    return any(module == t.path for g in groups for t in g.targets)


def _in_path(mutant: str, group: Group) -> bool:
    return any(
        mutant.startswith(t.path.removesuffix(".py").replace("/", ".") + ".") for t in group.targets
    )


def print_table(summary: dict[str, Any], groups: list[Group]) -> None:
    print(
        f"{'module':34} {'mutants':>7} {'caught':>6} {'missed':>6} {'equiv':>5} {'left':>5} "
        f"{'score':>6}"
    )
    for path, m in summary["modules"].items():
        if not _in(path, groups):
            continue
        caught = m["killed"] + m["timeout"] + m["type_check"]
        missed = m["survived"] + m["no_tests"] + m["suspicious"]
        score = "-" if m["score"] is None else f"{m['score']:.1f}%"
        left = m["not_checked"]
        print(
            f"{path:34} {m['mutants']:7} {caught:6} {missed:6} {m['equivalent']:5} {left:5} "
            f"{score:>6}"
        )
    for prefix, t in summary["totals"].items():
        if t["modules"]:
            print(f"{prefix} (all measured modules): {t['score']}% of {t['caught'] + t['missed']}")
    left = [s for s in summary["survivors"] if _in(s["module"], groups)]
    print(f"{len(left)} survivor(s) left in this run's modules (diffs in {RESULTS})")
    for s in left[:40]:
        minus, plus = changed_lines(s["diff"])
        print(f"  {s['mutant']} [{s['status']}]: {' / '.join(minus)} -> {' / '.join(plus)}")
    if summary["stale_equivalents"]:
        print("stale equivalent entries (their mutant no longer survives with that line):")
        for e in summary["stale_equivalents"]:
            print(f"  {e.get('mutant')}: {e.get('line')}")


def markdown_table(summary: dict[str, Any]) -> str:
    """docs/testing.md's table: one row per module, then one per prefix (its total)."""
    cols = ["mutants", "killed", "timeout", "type_check", "survived", "no_tests", "equivalent"]
    head = "| module | " + " | ".join([*cols, "not checked", "score", "commit"]) + " |"
    rows = [head, "|---|" + "---:|" * (len(cols) + 2) + "---|"]
    for path, m in summary["modules"].items():
        score = "-" if m["score"] is None else f"{m['score']:.1f} %"
        cells = [str(m[c]) for c in cols] + [str(m["not_checked"]), score, m["commit"][:7]]
        rows.append(f"| `{path}` | " + " | ".join(cells) + " |")
    for prefix, t in summary["totals"].items():
        if t["modules"]:
            rows.append(
                f"| **{prefix} ({t['modules']} modules)** | {t['mutants']} | | | | | | "
                f"{t['equivalent']} | | **{t['score']} %** ({t['caught']} of "
                f"{t['caught'] + t['missed']}) | |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paths", nargs="*", default=[], help="modules or folders (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="mutants at a time (default 2)")
    ap.add_argument("--nice", type=int, default=15, help="niceness of the run (default 15)")
    ap.add_argument("--hypothesis-examples", type=int, default=25)
    ap.add_argument("--report", action="store_true", help="only read the last run's results")
    ap.add_argument(
        "--markdown",
        action="store_true",
        help="print the per-module table of bench/results/mutation.json as markdown (no run)",
    )
    ap.add_argument(
        "--survivors",
        action="store_true",
        help="rerun only the last run's survivors against the current tests",
    )
    ap.add_argument("--priority", action="store_true", help="only the money/signature modules")
    ap.add_argument(
        "--only-tests",
        nargs="*",
        default=[],
        help="run against just these test files (faster, may under-count kills; own work dir)",
    )
    ap.add_argument(
        "--tests",
        nargs="*",
        default=["tests/unit/test_rules_*.py", "tests/integration/test_output_mismatch.py"],
        help="with --survivors: test files (globs) to add to the measured copy",
    )
    args = ap.parse_args(argv)

    if args.markdown:
        print(markdown_table(json.loads(RESULTS.read_text())))
        return 0
    paths = list(args.paths) or (PRIORITY if args.priority else [])
    groups = select(paths)
    if args.only_tests:
        for g in groups:
            g.only_tests = list(args.only_tests)
            g.suffix = "-only"
    if args.paths:  # its own work dir per selection: --survivors reruns it after other runs
        for g in groups:
            g.suffix += "-" + "+".join(Path(t.path).stem for t in g.targets)[:80]
    py = load_pyproject()
    base = base_config(py)
    t0 = time.monotonic()
    meta = {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/mutation.py " + " ".join(argv or sys.argv[1:]),
        "workers": args.workers,
        "hypothesis_examples": args.hypothesis_examples,
        "load_before": os.getloadavg()[0],
    }
    durations: dict[str, float] = {}
    mcfg = py.get("tool", {}).get("edgeswarm", {}).get("mutation", {})
    text_rule = bool(mcfg.get("error_text_is_equivalent"))
    if not args.report:
        for group in groups:
            cfg = group.mutmut_config(base, args.hypothesis_examples)
            names = group.globs()
            if args.survivors:  # not the equivalent ones: they survive by definition
                last = summarize([group], equivalents(py), meta, text_rule)
                names = [x["mutant"] for x in last["survivors"] if _in(x["module"], [group])]
                if not names:
                    print(f"[{group.name}] no survivors to rerun")
                    continue
            add = sorted(
                str(p.relative_to(ROOT)) for g in args.tests for p in ROOT.glob(g) if p.is_file()
            )
            prepare(group, cfg, args.hypothesis_examples, not args.survivors, add)
            durations[group.name] = round(run_mutmut(group, args.workers, names, args.nice), 1)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    meta["group_seconds"] = durations
    meta["load_after"] = os.getloadavg()[0]
    summary = summarize(groups, equivalents(py), meta, text_rule)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(RESULTS)
    print_table(summary, groups)
    print(f"took {meta['seconds']} s; wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
