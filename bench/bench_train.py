"""Trainer benchmark: our in-process trainer vs llama.cpp's own ``llama-finetune``.

Same FP32 model (the dequantized default base), same data (the fractional-CTO example
conversations rendered with the model's chat template), same context (256), batch = ubatch =
context, same threads, plain SGD. Throughput is measured two ways:

- *differential* (the headline): each trainer runs twice as a fresh process, on a small and a
  large number of windows; tokens/s = (extra windows x n_ctx) / (extra wall seconds). Start-up,
  model load and the final model save cancel out, the two trainers are measured identically.
- *in-loop*: our trainer's own clock around the step loop; llama-finetune's progress-bar clock
  (whole seconds only, so coarse).

Then a quality run on more windows: loss, LoRA extraction (rank, energy), validation loss of
base / trained / adapter-on-served-base, greedy samples, the gate. Peak memory is ``ru_maxrss``
from ``os.wait4`` of each child process.

    .venv/bin/python bench/bench_train.py                 # build llama-finetune if needed, run all
    .venv/bin/python bench/bench_train.py --small 3 --large 9 --quality 24 --threads 2

Everything heavy goes under bench/.work/ (git-ignored). Results print as JSON and Markdown;
``--write-results`` replaces the ``## Trainer`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORK = REPO / "bench" / ".work"
LLAMA_SRC = Path("/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
FINETUNE_BIN = WORK / "build" / "bin" / "llama-finetune"
BASE = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 256


def build_finetune(jobs: int = 2) -> Path:
    """cmake-build only the llama-finetune target from the vendored llama.cpp into bench/.work/build."""
    if FINETUNE_BIN.exists():
        return FINETUNE_BIN
    build = WORK / "build"
    subprocess.run(
        ["cmake", "-S", str(LLAMA_SRC), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        check=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-finetune", "-j", str(jobs)], check=True)
    return FINETUNE_BIN


def load_conversations(n: int = 600) -> list[list[dict[str, str]]]:
    data = WORK / "data" / "conversations.jsonl"
    if not data.exists():
        gen = REPO / "examples" / "fractional-cto" / "generate.py"
        subprocess.run([sys.executable, str(gen), "--out", str(data.parent), "--n", str(n)], check=True)
    return [json.loads(line)["messages"] for line in data.read_text().splitlines() if line.strip()]


def render(convs: list[list[dict[str, str]]]) -> list[str]:
    from adapter_chat.chat_template import ChatTemplate
    from adapter_chat.gguf_info import BaseModelInfo

    template = ChatTemplate.from_model(BaseModelInfo.load(BASE, sha256="-"))
    return [template.render(m, add_generation_prompt=False) for m in convs]


def text_for_tokens(texts: list[str], n_tokens: int) -> str:
    """A prefix of the concatenated texts holding at least ``n_tokens`` tokens (base vocab)."""
    from trainer.llama_opt import InferenceSession

    with InferenceSession(BASE, n_ctx=N_CTX, threads=1) as s:
        out, count = [], 0
        for t in texts:
            out.append(t)
            count += len(s.tokenize(t))
            if count >= n_tokens:
                break
        toks = s.tokenize("".join(out))[:n_tokens]
        return s.detokenize(toks)


def run_child(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS (MiB) from wait4, and its output."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed ({os.waitstatus_to_exitcode(status)}), see {log}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": stdout, "log": str(log)}


def ours(text_file: Path, threads: int, tag: str) -> dict[str, Any]:
    res = run_child(
        [sys.executable, __file__, "--child-ours", str(text_file), "--threads", str(threads)],
        WORK / f"ours-{tag}.log",
    )
    res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
    return res


def theirs(f32: Path, text_file: Path, threads: int, tag: str) -> dict[str, Any]:
    cmd = [
        str(FINETUNE_BIN), "-m", str(f32), "-f", str(text_file), "-c", str(N_CTX), "-b", str(N_CTX),
        "-ub", str(N_CTX), "-t", str(threads), "-tb", str(threads), "-opt", "sgd", "-lr", "2e-3",
        "-epochs", "1", "-val-split", "0", "-o", str(WORK / f"finetune-{tag}.gguf"),
    ]  # fmt: skip
    res = run_child(cmd, WORK / f"finetune-{tag}.log")
    res.pop("stdout")
    text = Path(res["log"]).read_text(errors="replace")
    # progress bar: "] data=0000012/0000012 loss=...±... acc=... t=00:00:33 ETA=..."
    bars = re.findall(r"data=(\d+)/(\d+) loss=([\d.]+)\S* acc=\S+ t=(\d+):(\d+):(\d+)", text)
    if not bars:
        raise RuntimeError(f"no progress bar in {res['log']}")
    done, _total, loss, h, m, s = bars[-1]
    res.update(
        windows=int(done),
        final_loss_mean=float(loss),
        loop_s=int(h) * 3600 + int(m) * 60 + int(s),
        command=" ".join(cmd),
    )
    res["loop_tokens_per_s"] = res["windows"] * N_CTX / res["loop_s"] if res["loop_s"] else None
    return res


def child_ours(text_file: Path, threads: int) -> None:
    from trainer.finetune import TrainConfig, train

    cfg = TrainConfig(base_model=BASE, cache_dir=WORK / "cache", n_ctx=N_CTX, lr=2e-3, optimizer="sgd", method="full",
                      threads=threads, shuffle=False)  # fmt: skip
    r = train(cfg, [text_file.read_text()], out_path=WORK / "ours-out.gguf")
    print(json.dumps({"windows": r.steps, "loop_tokens_per_s": r.tokens_per_s, "first_loss": r.first_loss,
                      "final_loss": r.final_loss, "train_wall_s": r.wall_s}))  # fmt: skip


def quality(texts: list[str], convs: list[list[dict[str, str]]], windows: int, threads: int) -> dict[str, Any]:
    """Train on ``windows`` windows, extract, evaluate on held-out conversations."""
    import resource

    from trainer.evaluate import evaluate, gate
    from trainer.extract import DeltaSpectra, save_lora
    from trainer.finetune import ConsoleProgress, TrainConfig, train

    n_val = 40
    train_texts, val_texts = texts[:-n_val], texts[-n_val:]
    prompts = [c[:-1] for c in convs[-2:]]
    text = text_for_tokens(train_texts, windows * N_CTX + 1)
    cfg = TrainConfig(base_model=BASE, cache_dir=WORK / "cache", n_ctx=N_CTX, lr=2e-3, optimizer="sgd", threads=threads, method="full")
    t0 = time.perf_counter()
    r = train(cfg, [text], callbacks=[ConsoleProgress()], out_path=WORK / "quality-trained.gguf")
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    spectra = DeltaSpectra.load(r.base_f32, r.trained)
    ex = spectra.extract(fidelity=0.9, max_rank=32)
    t_extract = time.perf_counter() - t0
    energy_at = {k: round(spectra.extract(rank=k, max_rank=64).mean_energy, 4) for k in (4, 8, 16, 32)}
    adapter = save_lora(ex, WORK / "quality-adapter.gguf", architecture="llama")
    t0 = time.perf_counter()
    rep = evaluate(BASE, adapter, val_texts, trained=r.trained, prompts=prompts, threads=threads, max_tokens=80)
    t_eval = time.perf_counter() - t0
    passed, why = gate(rep, margin=0.0)
    return {
        "windows": r.steps,
        "tokens_per_s": r.tokens_per_s,
        "train_s": t_train,
        "first_loss": r.first_loss,
        "final_loss": r.final_loss,
        "rank": ex.rank,
        "energy_mean": ex.mean_energy,
        "energy_min": ex.min_energy,
        "energy_at_rank": energy_at,
        "extract_s": t_extract,
        "eval_s": t_eval,
        "val_loss": {"base_q4_1": rep.base.loss, "trained_f32": rep.trained.loss if rep.trained else None,
                     "adapter_on_q4_1": rep.adapter.loss},  # fmt: skip
        "val_tokens": rep.base.tokens,
        "gate": {"passed": passed, "reason": why},
        "samples": [{"base": s.base, "adapter": s.adapter} for s in rep.samples],
        "peak_rss_mib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# Measured by hand on 2026-11-26 on the same shared machine (1-min load 4-5), kept with the results.
OMP_NOTE = """\
OpenMP wait policy (measured separately, same shared machine, load 4-5): llama-cpp-python 0.3.36 links
libgomp, whose workers spin-wait. With another busy process on the two cores, two-thread llama.cpp work
collapses: one SmolLM2 training window took 9.6-17.7 s by default vs 5.4-5.7 s with
`OMP_WAIT_POLICY=PASSIVE`; on the tiny test model 9 training windows took 11.1 s vs 0.25 s, and 12
scoring decodes 4.1 s vs 0.03 s (1 thread: 0.03 s either way). The nightly trainer shares the cores
with the server, so setting `OMP_WAIT_POLICY=PASSIVE` in the trainer's entry point (before llama_cpp
is imported) is recommended; its cost on an idle machine was not measured."""


def markdown(res: dict[str, Any], argv: str) -> str:
    o_s, o_l, t_s, t_l, q = res["ours_small"], res["ours_large"], res["theirs_small"], res["theirs_large"], res["quality"]
    lines = [
        "## Trainer",
        "",
        f"Measured {res['date']} on {res['cpu']} ({os.cpu_count()} cores, no GPU), threads={res['threads']}, "
        f"n_ctx={N_CTX}, SGD lr 2e-3, model = SmolLM2-135M-Instruct dequantized to FP32 (540 MB). "
        f"Load average before/after: {res['load_before']} / {res['load_after']}.",
        "",
        "Command (from the repo root):",
        "",
        "```",
        f".venv/bin/python bench/bench_train.py {argv}".rstrip(),
        "```",
        "",
        "llama-finetune was built from the same vendored llama.cpp (llama-cpp-python 0.3.36) with "
        "`cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF` target `llama-finetune` only, and run as:",
        "",
        "```",
        t_l["command"],
        "```",
        "",
        f"Each configuration ran {res['repeat']}x interleaved (ours, llama-finetune, ...); the fastest run counts.",
        "",
        "| | windows (small / large) | wall s (small / large) | differential tok/s | in-loop tok/s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
        f"| ours (`trainer.finetune.train`) | {o_s['windows']} / {o_l['windows']} | {o_s['wall_s']:.1f} / {o_l['wall_s']:.1f} "
        f"| **{res['ours_tok_s']:.1f}** | {o_l['loop_tokens_per_s']:.1f} | {o_l['peak_rss_mib']:.0f} |",
        f"| llama-finetune | {t_s['windows']} / {t_l['windows']} | {t_s['wall_s']:.1f} / {t_l['wall_s']:.1f} "
        f"| **{res['theirs_tok_s']:.1f}** | {t_l['loop_tokens_per_s']:.1f} (1 s clock) | {t_l['peak_rss_mib']:.0f} |",
        "",
        f"**Ratio ours / llama-finetune (differential): {res['ratio']:.1%}** (goal >= 95%).",
        "",
        *(
            [
                f"Caveat: the machine was shared during this run (1-min load average {res['load_before'][0]} "
                f"on {os.cpu_count()} cores: other benches, a server, compiles). Absolute speeds are far below a "
                "quiet machine (about 95 tok/s for one 256-token window in ~2.7 s); llama.cpp's OpenMP workers "
                "spin-wait, which oversubscription punishes hard. Both trainers ran interleaved under the same "
                "conditions, so the ratio is the meaningful number; rerun the command on an idle machine for "
                "absolute figures.",
                "",
            ]
            if max(res["load_before"][0], res["load_after"][0]) > res["threads"]
            else []
        ),
        "Differences that remain by design: llama-finetune trains every F32 tensor (norms too), we train "
        "the 7 block matrices; both skip token_embd (llama.cpp FIXME). Both run one optimizer step per "
        "256-token window.",
        "",
        f"Quality run ({q['windows']} windows of the fractional-CTO example, {q['train_s']:.0f} s training "
        f"at {q['tokens_per_s']:.1f} tok/s): loss {q['first_loss']:.3f} (first window) -> {q['final_loss']:.3f} (last). "
        f"Extraction (fidelity 0.9, mean rule, max rank 32): rank **{q['rank']}**, energy mean {q['energy_mean']:.1%}, "
        f"min {q['energy_min']:.1%}; mean energy at rank 4/8/16/32: "
        + ", ".join(f"{v:.1%}" for v in q["energy_at_rank"].values())
        + f" ({q['extract_s']:.1f} s). Validation ({q['val_tokens']} tokens, 40 held-out conversations): "
        f"base Q4_1 {q['val_loss']['base_q4_1']:.4f}, trained FP32 {q['val_loss']['trained_f32']:.4f}, "
        f"adapter on Q4_1 base via llama_adapter_lora_init {q['val_loss']['adapter_on_q4_1']:.4f} ({q['eval_s']:.1f} s). "
        f"Gate (margin 0): {'passed' if q['gate']['passed'] else 'refused'} — {q['gate']['reason']}. "
        f"Peak RSS of the quality process (train + extract + eval): {q['peak_rss_mib_process']:.0f} MiB.",
        "",
        OMP_NOTE,
        "",
        "Greedy sample, held-out prompt, base vs adapter:",
        "",
        "```",
        "base:    " + q["samples"][0]["base"].replace("\n", " ")[:300],
        "adapter: " + q["samples"][0]["adapter"].replace("\n", " ")[:300],
        "```",
        "",
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    m = re.search(r"^## Trainer\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m:
        text = text[: m.start()] + section + text[m.end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=3, help="windows in the small run")
    p.add_argument("--large", type=int, default=9, help="windows in the large run")
    p.add_argument("--quality", type=int, default=24, help="windows in the quality run (0 to skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="interleaved repeats per configuration (fastest counts)")
    p.add_argument("--write-results", action="store_true", help="replace the ## Trainer section of bench/RESULTS.md")
    p.add_argument("--from-json", type=Path, help="re-render (and with --write-results, write) a saved bench_train.json")
    p.add_argument("--child-ours", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_ours:
        child_ours(args.child_ours, args.threads)
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        section = markdown(saved, saved.get("argv", ""))
        print(section)
        if args.write_results:
            write_section(section)
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    build_finetune()
    from trainer.finetune import f32_base

    f32, _ = f32_base(BASE, WORK / "cache")
    convs = load_conversations()
    texts = render(convs)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "?"),  # fmt: skip
        "threads": args.threads,
        "repeat": args.repeat,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    files = {}
    for tag, n in (("small", args.small), ("large", args.large)):
        files[f"ours_{tag}"] = WORK / f"ours-{tag}.txt"
        files[f"ours_{tag}"].write_text(text_for_tokens(texts, n * N_CTX + 1))
        # llama-finetune uses stride n_ctx/2: ndata = (tokens - n_ctx - 1) / (n_ctx/2)
        files[f"theirs_{tag}"] = WORK / f"finetune-{tag}.txt"
        files[f"theirs_{tag}"].write_text(text_for_tokens(texts, N_CTX + 1 + n * N_CTX // 2 + 8))
    # interleaved repeats; the fastest run of each configuration counts (least disturbed)
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for tag in ("small", "large"):
            for who in ("ours", "theirs"):
                key = f"{who}_{tag}"
                print(f"[{rep + 1}/{args.repeat}] {key}...", file=sys.stderr)
                if who == "ours":
                    r = ours(files[key], args.threads, tag)
                else:
                    r = theirs(f32, files[key], args.threads, tag)
                runs.setdefault(key, []).append(r)
                print(f"    wall {r['wall_s']:.1f} s, {r['windows']} windows, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for key, rs in runs.items():
        res[key] = min(rs, key=lambda r: r["wall_s"])
        res[key]["all_wall_s"] = [round(r["wall_s"], 2) for r in rs]

    def diff(a: dict[str, Any], b: dict[str, Any]) -> float:
        return (b["windows"] - a["windows"]) * N_CTX / (b["wall_s"] - a["wall_s"])

    res["ours_tok_s"] = diff(res["ours_small"], res["ours_large"])
    res["theirs_tok_s"] = diff(res["theirs_small"], res["theirs_large"])
    res["ratio"] = res["ours_tok_s"] / res["theirs_tok_s"]
    if args.quality:
        print(f"[quality] {args.quality} windows, extract, evaluate...", file=sys.stderr)
        res["quality"] = quality(texts, convs, args.quality, args.threads)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    res["argv"] = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-results")
    (WORK / "bench_train.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if args.quality:
        section = markdown(res, res["argv"])
        print(section)
        if args.write_results:
            write_section(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
