"""The whole nightly for the fractional-CTO adapter, LoRA path vs today's path, back to back.

Each nightly (dataset -> train -> evaluate -> gate -> publish) runs as a fresh
``python -m trainer nightly`` child process on the example's data, in its own folder under
bench/.work/nightly/<path>/ (fresh cache: today's path pays for its FP32 copy, as a first
nightly does). Wall time and peak RSS come from ``os.wait4``; stage times, training tokens/s and
the gate's numbers from the run's ``outcome.json`` and metrics. The machine's raw single-sequence
decode rate is measured right before, so the figures can be scaled to another machine.

- ``lora``: ``examples/fractional-cto/trainer.toml`` as committed (LoRA trained directly, the
  base frozen in its FP32 copy, assistant-only loss, task score with ``style_check.is_house_style_distinct``).
- ``full``: today's path before this change: full finetune of the FP32 copy (SGD, lr 2e-3,
  one epoch, ``windows = "stream"``: every token of the items concatenated and cut into 256-token
  windows, every token a target, as the trainer did) and an SVD extraction to a LoRA (90% energy,
  rank <= 32), no task score. It runs on the patched wheel, so its gradients are correct (the old bug made every
  step apply the sum of all earlier gradients; speed is the same).

``--full-site DIR`` runs the ``full`` path with the llama-cpp-python installed in DIR (put first on
its PYTHONPATH), so today's path can run on today's build too: before
``patches/llama-cpp-python-0.3.36-3-train-speed.patch`` that build had no sgemm, and the backward
through frozen matrices used ``out_prod``. Make DIR from the wheel ``make setup`` built at an
earlier commit: ``pip install --no-deps --target DIR ~/.cache/adapter-chat/wheels/<that build>/*.whl``.

    python examples/fractional-cto/generate.py --log examples/fractional-cto/data/conversations.sqlite3
    .venv/bin/python bench/bench_nightly.py --paths lora full
    .venv/bin/python bench/bench_nightly.py --paths lora --train epochs=2    # a variant of the lora path
    .venv/bin/python bench/bench_nightly.py --paths full --full-site /tmp/old-site  # today's path, today's build
    .venv/bin/python bench/bench_nightly.py --paths lora full --nights 2  # and the lora path's next night

``--nights 2`` runs the lora nightly a second time in the same folder after a day of new traffic
(``--new-exchanges`` more log rows from the example's generator): the steady state, where the
base's validation losses and answers come from the base cache (``trainer.base_cache``) and only
items new since are scored on the base.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXAMPLE = REPO / "examples" / "fractional-cto"
WORK = REPO / "bench" / ".work" / "nightly"
BASE = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TODAY = {  # the [train]/[gate] of examples/fractional-cto/trainer.toml before this change
    "method": '"full"', "windows": '"stream"', "n_ctx": "256", "epochs": "1", "lr": "2e-3", "optimizer": '"sgd"',
    "max_items": "400",
}  # fmt: skip


def config_for(path: str, root: Path, train: dict[str, str] | None = None) -> Path:
    """The example's trainer.toml with absolute paths into ``root``; ``full`` gets today's settings,
    ``lora`` the example's ``[train]`` with ``train``'s keys (TOML values) replaced or added."""
    text = (EXAMPLE / "trainer.toml").read_text(encoding="utf-8")
    text = text.replace('base_model = "../../models/', f'base_model = "{REPO}/models/')
    text = text.replace('logs = ["data/', f'logs = ["{EXAMPLE}/data/')
    text = text.replace('runs_db = "data/conversations.sqlite3"', f'runs_db = "{root}/runs.sqlite3"')
    text = text.replace('adapters_dir = "../../adapters"', f'adapters_dir = "{root}/adapters"')
    text = text.replace('cache_dir = "data/trainer-cache"', f'cache_dir = "{root}/cache"')
    text = text.replace('jsonl = ["data/', f'jsonl = ["{EXAMPLE}/data/')
    text = text.replace('scorer = "style_check.py:', f'scorer = "{EXAMPLE}/style_check.py:')
    if path == "full":
        head, _, rest = text.partition("[adapters.cto-house-style.train]")
        _, _, after = rest.partition("[adapters.cto-house-style.extract]")
        train = "\n".join(f"{k} = {v}" for k, v in TODAY.items())
        text = f"{head}[adapters.cto-house-style.train]\n{train}\nmax_val_items = 100\n\n[adapters.cto-house-style.extract]{after}"
        text = re.sub(r"^(scorer|min_score|score_prompts|score_max_tokens) = .*$", "", text, flags=re.M)
    for key, value in (train or {}).items() if path == "lora" else ():
        section = "[adapters.cto-house-style.train]\n"
        text, n = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        if not n:
            text = text.replace(section, f"{section}{key} = {value}\n", 1)
    out = root / "trainer.toml"
    out.write_text(text, encoding="utf-8")
    return out


def raw_decode_rate(tokens: int = 160) -> float:
    """Single-sequence greedy decode tokens/s of the bare base, in process (the machine's speed)."""
    from trainer.llama_opt import InferenceSession

    with InferenceSession(BASE, n_ctx=512, threads=2) as s:
        prompt = s.tokenize("<|im_start|>user\nTell me a long story about a lighthouse.<|im_end|>\n<|im_start|>assistant\n")
        s.generate_ids(prompt, max_tokens=8)  # warm up
        t0 = time.perf_counter()
        n = len(s.generate_ids(prompt, max_tokens=tokens))
        return n / (time.perf_counter() - t0)


def new_traffic(root: Path, night: int, n: int) -> Path:
    """``n`` more exchanges in a log file of their own under ``root``, as a day's traffic adds
    (the example's generator, another seed); the config's log glob already picks it up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cto_generate", EXAMPLE / "generate.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen  # its dataclasses look their module up
    spec.loader.exec_module(gen)
    from adapter_chat.chat_template import render_system_prompt

    system_prompt = render_system_prompt((EXAMPLE / "cto-house-style.j2").read_text(encoding="utf-8"), {})
    log = root / f"night-{night}.sqlite3"
    gen.write_log([log], n, 1000 + night, system_prompt=system_prompt, now=time.time())
    return log


def run_nightly(path: str, train: dict[str, str] | None = None, site: Path | None = None, *, night: int = 1,
                new_exchanges: int = 0) -> dict[str, Any]:
    """One nightly of ``path``. Night 1 starts from an empty folder (a first nightly: no cache, no
    version); night k > 1 runs again in the same folder after ``new_exchanges`` new log rows."""
    root = WORK / path
    if night == 1:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cfg = config_for(path, root, train)
        text = cfg.read_text(encoding="utf-8").replace('logs = ["', f'logs = ["{root}/night-*.sqlite3", "', 1)
        cfg.write_text(text, encoding="utf-8")
    else:
        cfg = root / "trainer.toml"
        new_traffic(root, night, new_exchanges)
    log = root / "nightly.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        env = dict(os.environ)
        if site is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "nightly", "--config", str(cfg)], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    outcome_files = sorted((root / "cache" / "runs").glob("*/*/outcome.json"))
    outcome = json.loads(outcome_files[-1].read_text()) if outcome_files else {}
    label = path + (f", night {night} (+{new_exchanges} exchanges)" if night > 1 else "")
    return {
        "path": label + (f" (llama-cpp-python from {site})" if site is not None else ""),
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "status": outcome.get("status"),
        "version": outcome.get("version"),
        "metrics": outcome.get("metrics", {}),
        "log_tail": log.read_text(encoding="utf-8").splitlines()[-12:],
        "adapter": str(max((root / "adapters" / "cto-house-style").glob("v*.gguf"), default="",
                           key=lambda p: int(p.stem[1:]))),  # the newest version
    }


def markdown(results: list[dict[str, Any]], raw: float, argv: str) -> str:
    lines = [f"Command: `{argv}`", "", f"Raw single-sequence decode of the base, measured first: **{raw:.0f} tok/s**.", "",
             "| path | wall | train | tokens/s | extract | evaluate | peak RSS | val loss adapter / base | task score adapter / base | gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        m = r["metrics"]
        tr, ev, ex = m.get("train", {}), m.get("eval", {}), m.get("extract", {})
        task = ev.get("task") or {}
        score = f"{task['adapter']:.0%} / {task['base']:.0%}" if task else "-"
        lines.append(
            f"| {r['path']} | {r['wall_s'] / 60:.1f} min | {tr.get('seconds', 0) / 60:.1f} min "
            f"| {tr.get('tokens_per_s', 0):.0f} | {ex.get('seconds', 0) / 60:.1f} min | {ev.get('seconds', 0) / 60:.1f} min "
            f"| {r['peak_rss_mb']:.0f} MB | {ev.get('val_loss_adapter', float('nan')):.3f} / {ev.get('val_loss_base', float('nan')):.3f} "
            f"| {score} | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--json", type=Path, default=WORK / "bench_nightly.json")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="replace or add a [train] key of the lora path (TOML value), e.g. epochs=2")
    p.add_argument("--full-site", type=Path, metavar="DIR",
                   help="run the full path with the llama-cpp-python installed in DIR (today's build)")
    p.add_argument("--nights", type=int, default=1,
                   help="lora path: run N nightlies in one folder, each after --new-exchanges more log rows")
    p.add_argument("--new-exchanges", type=int, default=40, metavar="N",
                   help="log rows a day adds before each night after the first (default 40)")
    args = p.parse_args(argv)
    train = dict(kv.split("=", 1) for kv in args.train)
    if not (EXAMPLE / "data" / "conversations.jsonl").exists():
        sys.exit("generate the data first: python examples/fractional-cto/generate.py --log "
                 "examples/fractional-cto/data/conversations.sqlite3")  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    raw = raw_decode_rate()
    results = []
    for path in args.paths:
        for night in range(1, (args.nights if path == "lora" else 1) + 1):
            results.append(run_nightly(path, train, args.full_site if path == "full" else None, night=night,
                                       new_exchanges=args.new_exchanges))  # fmt: skip
    args.json.write_text(json.dumps({"raw_decode_tok_s": raw, "results": results}, indent=2), encoding="utf-8")
    print(markdown(results, raw, "python bench/bench_nightly.py " + " ".join(sys.argv[1:])))
    for r in results:
        print(f"\n[{r['path']}] exit {r['exit']}:\n  " + "\n  ".join(r["log_tail"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
