"""Prompt tokens and seconds the chat prompt cache saves on turn 5 (`elm chat`'s ChatSession).

On the OpenELM-270M-shape model directory benchmarks/bench_generate.py writes (with the
OpenELM-instruct template elm ships), a five-turn chat runs through `elm_mlx.chat.ChatSession`,
which keeps one KV cache across turns and prefills only what the cache does not hold. Its
turn 5 is compared with the same turn 5 from an empty cache, which prefills the whole history
(what a chat that does not reuse its cache pays). The two alternate, round after round; the
prefill time is mlx-lm's own (`prompt_tokens / prompt_tps` of its stream_generate: up to the
first generated token).

    python benchmarks/bench_chat_prefill.py --workdir /tmp/bench-generate --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_generate import make_model, publish  # noqa: E402
from elm_spec.chat_template import SHIPPED_TEMPLATE  # noqa: E402

TURNS = 5


def user_messages(tokenizer, count: int, tokens: int) -> list[str]:
    """COUNT consecutive standard-library passages of TOKENS tokens each."""
    ids = tokenizer.encode((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(),
                           add_special_tokens=False)
    return [tokenizer.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(count)]


def turn_five(session, text: str) -> dict[str, float]:
    from elm_mlx.chat import TurnStats

    stats: list[TurnStats] = []
    first = None
    tokens = []
    for response in session.send(text, stats):
        first = first or response
        tokens.append(response.token)
    return {"prefilled": stats[0].prefilled_tokens, "prompt": stats[0].prompt_tokens,
            "seconds": first.prompt_tokens / first.prompt_tps, "answer": tuple(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-generate"))
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--message-tokens", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=16, help="Tokens per answer.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown report here too.")
    args = parser.parse_args()

    import elm_mlx
    from elm_mlx.chat import ChatSession

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.workdir, args.preset)
    template = REPO / "elm_spec" / "templates" / SHIPPED_TEMPLATE
    model, tokenizer = elm_mlx.load(model_dir, chat_template=str(template))
    messages = user_messages(tokenizer, TURNS, args.message_tokens)
    options = {"max_tokens": args.max_tokens}
    runs: dict[str, list[dict]] = {"cache": [], "fresh": []}
    loads = []
    for round_index in range(args.rounds):
        session = ChatSession(model, tokenizer, options=options)
        for text in messages[:-1]:
            for _ in session.send(text):
                pass
        history = [dict(m) for m in session.messages]
        runs["cache"].append(turn_five(session, messages[-1]))
        fresh = ChatSession(model, tokenizer, options=options)
        fresh.messages = history
        runs["fresh"].append(turn_five(fresh, messages[-1]))
        loads.append(os.getloadavg()[0])
        for name, rs in runs.items():
            print(f"round {round_index + 1} {name:5s}: {rs[-1]['prefilled']} of {rs[-1]['prompt']} "
                  f"tokens prefilled in {rs[-1]['seconds']:.3f} s", flush=True)

    same = len({r["answer"] for rs in runs.values() for r in rs}) == 1
    cache, fresh = runs["cache"][0], runs["fresh"][0]
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    paired = np.median([f["seconds"] / c["seconds"]
                        for c, f in zip(runs["cache"], runs["fresh"], strict=True)])
    lines = [
        f"Model: {args.preset} shape, fp32, the OpenELM-instruct template; {TURNS} user turns "
        f"of {args.message_tokens} tokens (standard-library text), {args.max_tokens}-token "
        f"greedy answers; {args.rounds} rounds alternating; {os.cpu_count()} CPU cores; load "
        f"average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}.",
        "",
        "| turn 5 | prompt tokens | prefilled | prefill seconds (best) |",
        "|---|---:|---:|---:|",
        f"| cache kept across turns (ChatSession) | {cache['prompt']} | {cache['prefilled']} | "
        f"{best['cache']:.3f} |",
        f"| empty cache (whole history re-prefilled) | {fresh['prompt']} | {fresh['prefilled']} | "
        f"{best['fresh']:.3f} |",
        f"| saved | | **{fresh['prefilled'] - cache['prefilled']}** tokens | "
        f"**{best['fresh'] - best['cache']:.3f}** s ({best['fresh'] / best['cache']:.1f}x less; "
        f"median of per-round ratios {paired:.1f}x) |",
        "",
        f"Same turn-5 answer with and without the cache in every round: {'yes' if same else 'NO'}.",
        "",
        "All rounds (prefill seconds, in run order):",
        *(f"- {name}: " + ", ".join(f"{r['seconds']:.3f}" for r in rs) for name, rs in runs.items()),
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
