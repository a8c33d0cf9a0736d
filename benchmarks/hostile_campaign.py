#!/usr/bin/env python3
"""Hostile-input campaign for saekit (issue 12): runs the CLI and the Python API on bad input.

Each case (benchmarks/hostile_cases.py) is a setup, a shell command run in the work folder, an
expectation, and optionally a check of the result and a rerun that must succeed afterwards:
  CLEAN         non-zero exit, saekit's own one-line message, no Traceback
  OK            exit 0 and the check of the result passes
  TRACEBACK     "Traceback" in the output (or a non-saekit exception escapes the API)
  SILENT-WRONG  exit 0 but the result is wrong, or an error was expected and none came
  BLOCKING      the rerun afterwards fails
  TIMEOUT       ran past the case time limit (inconclusive)
(rarely WRONG-ERROR: an error on valid input, UNCLEAR: non-zero exit without saekit's message,
SETUP-FAILED). Each command leads its own process group, killed whole on timeout or stop.

It first builds fixtures (small caches and SAEs of the embedded model) in the work folder: a
fresh folder under the system temp dir, or ``--work-dir`` (never inside the repository; reusing
one reuses its fixtures and skips the cases in its results.jsonl). As root it bind-mounts a
read-only folder there (unmounted at the end). The table (``--out``) is rewritten after every
case. Run from the repository root (27 min on 2 CPU cores, 2026-12-07)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_campaign.py --jobs 1 --out docs/hostile_campaign.md

``--only SUBSTR``, ``--skip NAME[,NAME]``, ``--no-api``, ``--timeout S`` (per case) and
``--budget MIN`` (no case starts later; the rest are listed as not run) pick what runs.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__":  # hostile_cases imports this module by name: one copy, not two
    sys.modules.setdefault("hostile_campaign", sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv/bin"
if not (BIN / "saekit").exists():
    BIN = Path(sys.executable).parent
S = str(BIN / "saekit")
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
SHIP = str(ROOT / "saekit/data/sae/gemma-3-270m-blocks.6-topk-16k")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
TINY = "base_train/topk_w64_k4"
TRAIN = "--latents 64 --k 4 --tokens 2048 --batch-size 64 --holdout-tokens 0"
C = None  # the work folder (a Path), set by main()
CASE_TIMEOUT = 240
LIVE = set()  # process-group ids of the commands running now
STOP = threading.Event()
DEADLINE = None  # no case starts after this time.time() (--budget)
STARTED = HEAD = "?"  # set by main()


def wd(rel=""):
    """a path in the work folder"""
    return C / rel


# ---------------------------------------------------------------- processes
def _start(cmd, sigint_default=False):
    # each command leads its own process group (session), so a timeout kills saekit and all it
    # started, not just the shell. SIG_DFL: a runner started in the background inherits SIGINT
    # ignored, and Python would keep ignoring it.
    if STOP.is_set():
        raise RuntimeError("campaign stopped")
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint_default else None
    p = subprocess.Popen(cmd, shell=True, cwd=C, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors="replace", start_new_session=True, preexec_fn=pre)
    LIVE.add(p.pid)
    return p


def _kill_group(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(p, timeout):
    """(rc, stdout, stderr) of p; on timeout its whole group is killed and rc is 124"""
    try:
        o, e = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        _kill_group(p)
        try:
            o, e = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something outside the group holds the pipes
            p.kill()
            o, e = "", ""
        rc = 124
        e = (e or "") + f"\nTIMEOUT after {timeout} s (load average {os.getloadavg()[0]:.1f})"
    finally:
        _kill_group(p)  # anything it left running in its group
        LIVE.discard(p.pid)
    return rc, o or "", e or ""


def sh(cmd, timeout=None):
    timeout = timeout or CASE_TIMEOUT
    t = time.time()
    rc, o, e = _finish(_start(cmd), timeout)
    return rc, o, e, time.time() - t


def interrupt(cmd, wait_for, sig, max_wait=400):
    """start cmd, wait until the glob wait_for matches, send sig to its process group"""
    p = _start("exec " + cmd, sigint_default=True)
    t = time.time()
    while time.time() - t < max_wait and p.poll() is None:
        if list(C.glob(wait_for)):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    if p.poll() is None:
        os.killpg(p.pid, sig)
    return _finish(p, 240)


def kill_all():
    STOP.set()
    for pid in list(LIVE):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------- files
def fresh(name):
    p = C / name
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)
    return p


def copytree(src, name):
    dst = fresh(name)
    shutil.copytree(C / src, dst, ignore=shutil.ignore_patterns(".saekit-lock"))
    return dst


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_json(p):
    return json.loads(Path(p).read_text())


def edit_json(p, fn):
    p = Path(p)
    d = fn(json.loads(p.read_text()))
    p.write_text(json.dumps(d, indent=2) if not isinstance(d, str) else d)


def no_sha(d):
    d.pop("weights_sha256", None)
    (d.get("saekit") or {}).pop("weights_sha256", None)
    return d


# ---------------------------------------------------------------- fixtures
def fixtures():
    C.mkdir(parents=True, exist_ok=True)
    steps = [
        ("base_cache", f"{S} cache --tokens 2048 --context 64 --out base_cache"),
        ("cache_l3", f"{S} cache --tokens 512 --context 64 --hook blocks.3.hook_resid_post --out cache_l3"),
        ("ref_cache_int", f"{S} cache --tokens 4096 --context 64 --shard-rows 8 --batch-rows 4 --out ref_cache_int"),
        (TINY, f"{S} train --activations base_cache --out base_train {TRAIN}"),
        ("ref_train_int", f"{S} train --activations base_cache --out ref_train_int --latents 64 --k 4 "
                          f"--tokens 300000 --batch-size 64 --holdout-tokens 0 --checkpoint-every 50"),
    ]
    for name, cmd in steps:
        if (C / name).exists() and (name == TINY or (C / name / "manifest.json").exists()
                                    or (C / name / "topk_w64_k4" / "sae_weights.safetensors").exists()):
            continue
        rc, o, e, t = sh(cmd, timeout=600)
        print(f"fixture {name}: rc={rc} {t:.0f}s", e.strip().splitlines()[-1:] if e else "", flush=True)
        assert rc == 0, e[-2000:]
    f = C / "files"
    (f / "adir").mkdir(parents=True, exist_ok=True)
    texts = {"empty.txt": "", "notext.jsonl": "\n".join(json.dumps({"body": f"hello world {i} " * 20}) for i in range(200)),
             "body.jsonl": "\n".join(json.dumps({"body": f"The cat sat on mat number {i}. " * 10}) for i in range(200)),
             "badjson.jsonl": '{"text": "ok line"}\n{"text": broken\n' * 50,
             "nonstr.jsonl": "\n".join(json.dumps({"text": i}) for i in range(200)),
             "tiny.txt": "Just a few words.\n", "whitespace.txt": "\n\n   \n\t\n" * 100,
             "prompts.txt": "Tell me a story.\nWhat is the weather?\n", "garbage.jsonl": "this is not json\n{\"feature\": \n",
             "adir/a.txt": "hello there " * 500, "afile": "i am a file\n"}
    for name, text in texts.items():
        (f / name).write_text(text)
    (f / "random.bin").write_bytes(random.Random(0).randbytes(20000))
    (f / "random.txt").write_bytes(random.Random(1).randbytes(20000))
    # a read-only folder: a read-only bind mount (root ignores file modes); unmounted by main()
    ro = C / "ro"
    if not is_mount(ro):
        (C / "rosrc").mkdir(exist_ok=True)
        ro.mkdir(exist_ok=True)
        r = subprocess.run(f"mount --bind {shlex.quote(str(C / 'rosrc'))} {shlex.quote(str(ro))} && "
                           f"mount -o remount,ro,bind {shlex.quote(str(ro))}", shell=True,
                           capture_output=True, text=True)
        if r.returncode != 0:
            ro.chmod(0o555)
            print(f"warning: no read-only bind mount ({r.stderr.strip()[-200:]}); {ro} is mode 555, "
                  "which root can still write", flush=True)
    # SAE with d_in 320 (consistent with its weights)
    d320 = C / "sae_d320"
    if not d320.exists():
        code = f"""
import json, torch
from safetensors.torch import save_file
from pathlib import Path
src = Path({str(C / TINY)!r}); dst = Path({str(d320)!r}); dst.mkdir()
cfg = json.loads((src/'cfg.json').read_text()); cfg['d_in'] = 320
cfg.pop('weights_sha256', None); (cfg.get('saekit') or {{}}).pop('weights_sha256', None)
(dst/'cfg.json').write_text(json.dumps(cfg, indent=2))
g = torch.Generator().manual_seed(0)
save_file({{'W_enc': torch.randn(320, 64, generator=g)*0.05, 'W_dec': torch.randn(64, 320, generator=g)*0.05,
           'b_dec': torch.zeros(320), 'b_enc': torch.zeros(64)}}, str(dst/'sae_weights.safetensors'))
"""
        subprocess.run([PY, "-c", code], check=True, env=ENV)


def is_mount(p):
    """os.path.ismount misses a bind mount from the same file system"""
    try:
        info = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(p)
    unesc = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)  # noqa: E731
    return str(Path(p).resolve()) in {unesc(ln.split()[4]) for ln in info if len(ln.split()) > 4}


def unmount_ro():
    ro = C / "ro" if C else None
    for _ in range(10):  # bind mounts can stack
        if not (ro and is_mount(ro)):
            return
        if subprocess.run(["umount", str(ro)], capture_output=True).returncode != 0:
            return


# ---------------------------------------------------------------- case registry
CASES = []


def case(name, cmd, expect="error", setup=None, check=None, rerun=None, rerun_check=None,
         interrupt_spec=None, want_rc=None, note=""):
    CASES.append(dict(name=name, cmd=cmd, expect=expect, setup=setup, check=check, rerun=rerun,
                      rerun_check=rerun_check, interrupt=interrupt_spec, want_rc=want_rc, note=note))


# ---------------------------------------------------------------- classification
def last_lines(s, n=3):
    lines = [ln for ln in s.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln and "tok/s]" not in ln]
    return " | ".join(lines[-n:])[-600:]


def run_case(c):
    if STOP.is_set() or (DEADLINE and time.time() > DEADLINE):
        return None
    try:
        if c["setup"]:
            c["setup"]()
    except Exception as ex:
        return dict(name=c["name"], cmd=c["cmd"], cls="SETUP-FAILED", rc=None, t=0, detail=repr(ex), note=c["note"])
    t0 = time.time()
    if c["interrupt"]:
        cmd, wait_for, sig = c["interrupt"]
        rc, o, e = interrupt(cmd, wait_for, sig)
        c = dict(c, cmd=f"{cmd}   # {signal.Signals(sig).name} once {wait_for} exists, then rerun")
    else:
        rc, o, e, _ = sh(c["cmd"])
    t = time.time() - t0
    out = o + e
    detail = last_lines(e or o)
    cls, why = None, ""
    if "Traceback" in out:
        cls = "TRACEBACK"
        detail = last_lines(e, 4)
    elif rc == 124:
        cls, why = "TIMEOUT", "ran over the case time limit"
    elif c["interrupt"]:
        if c["want_rc"] == 130 and rc != 130:
            cls, why = "SILENT-WRONG", f"SIGINT gave rc {rc}, README promises 130"
    elif rc != 0:
        if c["expect"] == "ok":
            cls, why = "WRONG-ERROR", "an error where the input is valid"
        elif not detail.strip().startswith("saekit") and "error" not in detail.lower():
            cls, why = "UNCLEAR", "non-zero exit without saekit's message"
        else:
            cls = "CLEAN"
    else:  # rc == 0
        if c["expect"] == "error":
            cls, why = "SILENT-WRONG", "exit 0 on bad input"
        elif c["check"]:
            try:
                why = c["check"]()
                cls = "OK"
            except Exception as ex:
                cls, why = "SILENT-WRONG", f"check failed: {ex}"
        else:
            cls = "OK"
    if c["rerun"] and cls not in ("TRACEBACK",):
        rc2, o2, e2, _ = sh(c["rerun"], timeout=300)
        ok2 = rc2 == 0 and "Traceback" not in (o2 + e2)
        if ok2 and c["rerun_check"]:
            try:
                why = (why + "; " if why else "") + "rerun: " + str(c["rerun_check"]())
            except Exception as ex:
                ok2 = False
                e2 = f"rerun check failed: {ex}"
        if not ok2:
            cls = "BLOCKING" if cls in (None, "CLEAN", "OK") else cls + "+BLOCKING"
            why = (why + "; " if why else "") + f"rerun `{c['rerun']}` rc={rc2}: {last_lines(e2 or o2)}"
        elif cls is None:
            cls = "OK"
        else:
            why = (why + "; " if why else "") + "rerun ok"
    return dict(name=c["name"], cmd=c["cmd"], cls=cls, rc=rc, t=t, detail=detail, why=why, note=c["note"],
                stderr_tail="\n".join(e.replace("\r", "\n").splitlines()[-15:]))


def run_api(api_code):
    """the API block of hostile_cases.py, in one process; one row per sub-case"""
    script = C / "api_cases.py"
    script.write_text(api_code)
    rc, o, e, t = sh(f"{PY} api_cases.py {shlex.quote(str(C))}", timeout=600)
    line = [ln for ln in o.splitlines() if ln.startswith("JSONRESULT")]
    if not line:
        return [dict(name="api/(script)", cmd=f"{PY} api_cases.py WORKDIR", cls="TRACEBACK", rc=rc, t=t,
                     detail=(e or o)[-1500:], note="", stderr_tail=(e or o)[-1500:])]
    rows = []
    for name, status, detail in json.loads(line[0][len("JSONRESULT"):]):
        cls = {"CLEAN": "CLEAN", "OK": "OK", "FOREIGN": "TRACEBACK", "SILENT-WRONG": "SILENT-WRONG",
               "WRONG-ERROR": "SILENT-WRONG"}[status]
        rows.append(dict(name=name, cmd="(python API, see API in benchmarks/hostile_cases.py)", cls=cls, rc=None,
                         t=t / 30, detail=detail, stderr_tail=detail,
                         note="FOREIGN = a non-saekit exception escapes" if status == "FOREIGN" else ""))
    return rows


def write_table(rows, path, skipped=(), workdir="", quiet=True):
    rows = [dict(r) for r in rows]
    overrides = getattr(sys.modules.get("hostile_cases"), "OVERRIDES", {})
    for r in rows:
        if r["name"] in overrides and r["cls"] == overrides[r["name"]][0]:
            r["cls"], r["note"] = overrides[r["name"]][1:]
        if r["cls"] == "TIMEOUT" and not r.get("note"):
            r["note"] = "inconclusive"
    cnt = Counter(r["cls"] for r in rows)
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} .venv/bin/python " + \
        shlex.join(["benchmarks/hostile_campaign.py"] + sys.argv[1:])
    lines = ["# saekit hostile-input campaign (issue 12)", "",
             f"Run {STARTED} to {time.strftime('%H:%M UTC', time.gmtime())}, started at commit {HEAD} by `{cmd}`, "
             f"in the work folder {workdir} (WORKDIR below), CPU. Commands run in WORKDIR; "
             "`<repo>` is the repository root.", "",
             f"**{len(rows)} cases**: " + ", ".join(f"{k} {v}" for k, v in sorted(cnt.items())), ""]
    if skipped:
        lines += [f"Not run ({len(skipped)}): " + ", ".join(skipped), ""]
    lines += ["| # | case | class | rc | s | what happened | command |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        what = (r.get("why") or "") + (" — " if r.get("why") else "") + r["detail"]
        if r.get("note"):
            what = f"[{r['note']}] " + what
        what = what.replace(str(ROOT), "<repo>").replace(str(C), "WORKDIR")
        shown = r["cmd"].replace(str(ROOT), "<repo>").replace(str(C), "WORKDIR")
        lines.append(f"| {i} | {r['name']} | {r['cls']} | {r['rc']} | {r['t']:.0f} | "
                     f"{what.replace('|', '/').replace(chr(10), ' ')[:500]} | `{shown.replace('|', '/')[:300]}` |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines[:7]))


def git_head():
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")


# ---------------------------------------------------------------- main
def main():
    global C, CASE_TIMEOUT, DEADLINE, STARTED, HEAD
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--skip", action="append", default=[], help="case name(s) not to run, comma-separated")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-api", action="store_true")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per case command")
    ap.add_argument("--budget", type=float, default=None,
                    help="minutes from the start after which no case starts (the rest are listed as not run)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="work folder (default: a fresh folder under the system temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/hostile_campaign.md", help="markdown table to write")
    a = ap.parse_args()
    CASE_TIMEOUT = a.timeout
    DEADLINE = time.time() + a.budget * 60 if a.budget else None
    STARTED, HEAD = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), git_head()
    if a.work_dir is None:
        C = Path(tempfile.mkdtemp(prefix="saekit-hostile-"))
    else:
        C = a.work_dir.resolve()
        if C == ROOT or ROOT in C.parents:
            ap.error(f"--work-dir {a.work_dir} is inside the repository {ROOT}; name a folder outside it")
        C.mkdir(parents=True, exist_ok=True)
    out = a.out.resolve()
    print(f"work folder {C}; table {out}", flush=True)

    import hostile_cases
    names = {c["name"] for c in CASES}
    skip = {n.strip() for s in a.skip for n in s.split(",") if n.strip()}
    unknown = skip - names
    if unknown:
        ap.error(f"--skip names no case: {', '.join(sorted(unknown))}")

    def on_term(signum, frame):
        kill_all()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    ex = ThreadPoolExecutor(a.jobs)
    try:
        fixtures()
        done = {}
        resf = C / "results.jsonl"
        if resf.exists():
            for ln in resf.read_text().splitlines():
                r = json.loads(ln)
                done[r["name"]] = r
        cases = [c for c in CASES if a.only in c["name"] and c["name"] not in skip and c["name"] not in done]
        rows = [done[c["name"]] for c in CASES if c["name"] in done] + [r for n, r in done.items() if n.startswith("api/")]
        skipped = [c["name"] for c in CASES if c["name"] in skip]

        def keep(row):
            rows.append(row)
            with open(resf, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['cls']:13} {row['name']:50} rc={row['rc']} {row['t']:.0f}s  {row.get('why', '')[:100]} :: "
                  f"{row['detail'][-160:]}", flush=True)
            write_table(rows, out, skipped, C)

        # interrupt cases run alone afterwards (timing-sensitive)
        normal = [c for c in cases if not c["interrupt"]]
        inter = [c for c in cases if c["interrupt"]]
        futs = []
        if not a.no_api and (not a.only or "api" in a.only) and "api/steer-sae-as-string" not in done:
            futs.append(ex.submit(run_api, hostile_cases.API))
        futs += [ex.submit(run_case, c) for c in normal]
        for f in futs:
            r = f.result()
            for row in (r if isinstance(r, list) else [r] if r else []):
                keep(row)
        for c in inter:
            row = run_case(c)
            if row:
                keep(row)
        ran = {r["name"] for r in rows}
        late = [c["name"] for c in cases if c["name"] not in ran]
        if late:
            skipped += [f"{n} (--budget)" for n in late]
            print(f"not run, over --budget {a.budget} min: {', '.join(late)}", flush=True)
        write_table(rows, out, skipped, C, quiet=False)
    except KeyboardInterrupt:
        kill_all()
        print("stopped; the table holds the cases done so far", file=sys.stderr)
        return 130
    finally:
        kill_all()
        ex.shutdown(wait=True, cancel_futures=True)
        unmount_ro()
    print(f"work folder kept: {C}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
