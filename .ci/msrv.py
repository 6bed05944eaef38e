"""Fails when a locked dependency needs a newer Rust than the workspace's
`rust-version` says (the declared minimum must stay true as the lock file
moves). Only the packages built for this host count."""

import json
import subprocess
import sys


def version(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


host = next(
    line.split(": ", 1)[1]
    for line in subprocess.run(
        ["rustc", "-vV"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if line.startswith("host: ")
)
meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
)
built = {node["id"] for node in meta["resolve"]["nodes"]}
members = set(meta["workspace_members"])
declared = {
    p["rust_version"] for p in meta["packages"] if p["id"] in members and p.get("rust_version")
}
if len(declared) != 1:
    sys.exit(f"msrv: the workspace members declare {sorted(declared)}, want one rust-version")
declared = declared.pop()
needed = max(
    (version(p["rust_version"]), p["name"], p["version"])
    for p in meta["packages"]
    if p["id"] in built and p.get("rust_version")
)
print(f"msrv: declared {declared}; the locked dependencies need {'.'.join(map(str, needed[0]))} ({needed[1]} {needed[2]})")
if needed[0] > version(declared):
    sys.exit("msrv: raise rust-version in Cargo.toml (and the README), or pin the dependency")
