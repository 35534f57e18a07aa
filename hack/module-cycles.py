#!/usr/bin/env python3
"""Finds import cycles between the files of each crate in the workspace.

A file imports another when it names an item of that file's module by path:
`use crate::a::b::Item;`, `use super::b::{X, Y};`, or `crate::a::f()` in
code. Each crate's `src/` is read on its own (files are modules, resolved
the way rustc resolves them: `a.rs` or `a/mod.rs`, children in `a/`); a path
is charged to the deepest module that has a file. Declaring a child module
(`mod b;`) is not an import, so a parent and its `tests.rs` are not a cycle.

Prints every cycle (a strongly connected set of files, with the edges
between them) and exits 1 when there is one; exits 0 and prints a count
otherwise. Usage: hack/module-cycles.py [CRATE_DIR...] (default: every
workspace member with a src/).
"""
import os
import re
import sys

USE_RE = re.compile(r"\buse\s+((?:crate|super|self)\b[^;]*);", re.S)
PATH_RE = re.compile(r"\b((?:crate|super)(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")
COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"')


def module_files(src):
    """Maps module paths (tuples) to files for one crate's src/."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(root, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel[0] == "bin":
                continue  # binaries are crates of their own
            if rel in (["lib"], ["main"]):
                mod = ()
            elif rel[-1] == "mod":
                mod = tuple(rel[:-1])
            else:
                mod = tuple(rel)
            mods.setdefault(mod, full)
    return mods


def expand(use):
    """Expands one `use` tree into plain paths (`a::{b, c::d}` -> a::b, a::c::d)."""
    use = re.sub(r"\s+as\s+[A-Za-z_0-9]+", "", use)
    use = re.sub(r"\s+", "", use)
    out = []

    def walk(prefix, tree):
        depth, start, parts = 0, 0, []
        for i, ch in enumerate(tree):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(tree[start:i])
                start = i + 1
        parts.append(tree[start:])
        for part in parts:
            if not part:
                continue
            if "{" in part:
                head, rest = part.split("{", 1)
                walk(prefix + head, rest[: rest.rfind("}")])
            else:
                out.append(prefix + part)

    walk("", use)
    return out


def resolve(path, here, mods):
    """The deepest module with a file that `path` (crate::/super::...) names."""
    segs = [s for s in path.replace(" ", "").split("::") if s]
    base = list(here)
    while segs and segs[0] in ("super", "self", "crate"):
        head = segs.pop(0)
        if head == "crate":
            base = []
        elif head == "super":
            base = base[:-1]
    cur = tuple(base)
    best = cur if cur in mods else None
    for s in segs:
        cur = cur + (s,)
        if cur in mods:
            best = cur
        else:
            break
    return best


INLINE_MOD_RE = re.compile(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{")


def inline_modules(mod, text):
    """Splits a file's text into (module path, text) for the file itself and
    each inline `mod name { ... }` in it, so `super::` inside an inline
    `mod tests` resolves to the file's own module."""
    out, outer, pos = [], [], 0
    while True:
        m = INLINE_MOD_RE.search(text, pos)
        if not m:
            outer.append(text[pos:])
            break
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        outer.append(text[pos:m.start()])
        out += inline_modules(mod + (m.group(1),), text[m.end():i - 1])
        pos = i
    return [(mod, "".join(outer))] + out


def cycles_in(crate_dir):
    src = os.path.join(crate_dir, "src")
    mods = module_files(src)
    edges = {}
    for mod, path in mods.items():
        text = open(path, encoding="utf-8").read()
        text = STRING_RE.sub('""', COMMENT_RE.sub("", text))
        # A file's own module: `self::` and `super::` resolve from here. For
        # a non-mod.rs file `a/b.rs`, super is `a`; for `a/mod.rs` it is the
        # parent of `a` (rustc's rule), which module paths already encode.
        for here, body in inline_modules(mod, text):
            names = []
            for m in USE_RE.finditer(body):
                names += expand(m.group(1))
            names += [m.group(1) for m in PATH_RE.finditer(USE_RE.sub("", body))]
            for name in names:
                target = resolve(name, here, mods)
                if target is not None and target != mod:
                    edges.setdefault(mod, set()).add(target)
    return mods, edges, tarjan(list(mods), edges)


def tarjan(nodes, edges):
    index, low, on, stack, out, n = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def workspace_crates(root):
    crates = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", ".vmstream", "tests")
                       or dirpath == root]
        if "Cargo.toml" in files and os.path.isdir(os.path.join(dirpath, "src")):
            crates.append(dirpath)
    return sorted(crates)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    crates = sys.argv[1:] or workspace_crates(root)
    found = 0
    for crate in crates:
        mods, edges, comps = cycles_in(crate)
        for comp in comps:
            found += 1
            files = sorted(os.path.relpath(mods[m], root) for m in comp)
            print(f"import cycle in {os.path.relpath(crate, root)}: {' <-> '.join(files)}")
            for a in comp:
                for b in sorted(edges.get(a, ())):
                    if b in comp:
                        print(f"    {os.path.relpath(mods[a], root)} uses {os.path.relpath(mods[b], root)}")
    if found:
        print(f"{found} import cycle(s) between files of a crate", file=sys.stderr)
        return 1
    print(f"module cycles: none in {len(crates)} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
