"""Load generator: streamed /v1/completions at a set concurrency or arrival rate.

Per request it measures TTFT (time to the first non-empty text chunk), end-to-end latency and
output tokens (from the usage chunk), then TPOT = (e2e - TTFT) / (tokens - 1). Results are grouped
by the variant that answered (the `X-Trimserve-Variant` header), so an A/B experiment reports
each arm. `summarize` gives the JSON that `trimserve bench --json` writes and `trimserve report`
reads; `markdown` renders it as a table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

log = logging.getLogger(__name__)

WORDS = (
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
)


RETRY_AFTER_MAX_S = 30.0


@dataclass(frozen=True)
class LoadConfig:
    url: str
    models: tuple[str, ...] = ("full",)  # requests cycle over these names (variants or experiments)
    concurrency: int = 1
    rate: float | None = None  # requests per second (Poisson arrivals); None: closed loop at `concurrency`
    requests: int = 16
    duration_s: float | None = None  # if set, keep sending until then (instead of a request count)
    prompt_tokens: int = 128
    output_tokens: int = 64
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 300.0
    seed: int = 0
    prompt_pool: int = 0  # >0: reuse this many distinct prompts (to check answers); 0: every prompt unique
    # Mixed traffic: with a maximum set, each prompt's length (and each request's output length) is
    # drawn from [prompt_tokens, prompt_tokens_max] (log-uniform, so short ones dominate), seeded per prompt.
    prompt_tokens_max: int | None = None
    output_tokens_max: int | None = None
    disconnect_share: float = 0.0  # this share of requests drops its stream after a few chunks
    # Several models: `rounds` > 0 measures them one at a time, round by round (the order rotated
    # each round, `requests` split over the rounds), so drift on a shared machine hits each alike;
    # 0 mixes them in one run, request i going to models[i % len(models)] (A/B traffic).
    rounds: int = 0
    prompts: tuple[str, ...] = ()  # real prompts, cycled (prompt_tokens is then ignored); () makes them up
    chat: bool = False  # send each prompt as one user message to /v1/chat/completions
    # A 429 is retried this many times after the server's Retry-After (at most RETRY_AFTER_MAX_S),
    # as the official `openai` client does; 0 records the 429 as the request's answer.
    retries: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.prompt_tokens < 4 or self.output_tokens < 1:
            raise ValueError("concurrency, requests, output_tokens must be >= 1 and prompt_tokens >= 4")
        if (self.prompt_tokens_max or self.prompt_tokens) < self.prompt_tokens or (
            self.output_tokens_max or self.output_tokens
        ) < self.output_tokens:
            raise ValueError("prompt_tokens_max and output_tokens_max must not be below their minimum")
        if not 0 <= self.disconnect_share <= 1:
            raise ValueError("disconnect_share must be in [0, 1]")
        if self.rounds < 0 or (self.rounds and self.duration_s is not None):
            raise ValueError("rounds must be >= 0 and cannot be combined with a duration")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0 requests/s")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if not self.models:
            raise ValueError("name at least one model")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("a prompt is empty")


@dataclass
class RequestResult:
    index: int
    prompt_index: int
    model: str
    variant: str = ""
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    disconnected: bool = False  # the client dropped the stream on purpose (LoadConfig.disconnect_share)
    hung: bool = False  # no complete answer before the client's timeout
    refused: int = 0  # 429s answered before this result, each retried after its Retry-After
    events: list[str] = field(default_factory=list, repr=False)

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def make_prompt(index: int, tokens: int, seed: int = 0) -> str:
    """About `tokens` tokens of words, unique per index (so no prefix is shared between requests)."""
    rng = random.Random(seed * 1_000_003 + index)
    words = [rng.choice(WORDS) for _ in range(tokens - 4)]
    return f"Request {index}: " + " ".join(words)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, round(low * (high / low) ** rng.random())) if high > low else low


def request_shape(config: LoadConfig, prompt_index: int) -> tuple[int, int]:
    """(prompt tokens, output tokens) of a prompt: fixed, or drawn for mixed traffic (same per prompt)."""
    rng = random.Random(config.seed * 7_919 + prompt_index)
    prompt = _log_uniform(rng, config.prompt_tokens, config.prompt_tokens_max or config.prompt_tokens)
    output = _log_uniform(rng, config.output_tokens, config.output_tokens_max or config.output_tokens)
    return prompt, output


def prompt_of(config: LoadConfig, prompt_index: int) -> str:
    if config.prompts:
        return config.prompts[prompt_index % len(config.prompts)]
    return make_prompt(prompt_index, request_shape(config, prompt_index)[0], config.seed)


def read_prompts(path: Path) -> tuple[str, ...]:
    """Prompts from a file: JSON lines with a `prompt` (or `text`) field, else one prompt per line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if not lines[0].lstrip().startswith("{"):
        return tuple(lines)
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: needs a non-empty `prompt` (or `text`) string")
        prompts.append(text)
    return tuple(prompts)


def disconnect_after(config: LoadConfig, index: int) -> int | None:
    """Text chunks request `index` reads before dropping its stream, or None (reads to the end)."""
    rng = random.Random(config.seed * 104_729 + index)
    return rng.randint(1, 8) if rng.random() < config.disconnect_share else None


def retry_after_s(header: str | None) -> float:
    """Seconds a Retry-After header asks for (its seconds form), bounded to [0.1, RETRY_AFTER_MAX_S]."""
    try:
        seconds = float(header) if header else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.1), RETRY_AFTER_MAX_S)


async def read_answer(
    response: httpx.Response,
    result: RequestResult,
    config: LoadConfig,
    pieces: list[str],
    start: float,
    drop_after: int | None,
) -> bool:
    """Read one streamed answer into `result` and `pieces`; True when it ended with [DONE]."""
    result.status = response.status_code
    result.variant = response.headers.get("x-trimserve-variant", result.model)
    if response.status_code != 200:
        result.error = (await response.aread()).decode(errors="replace")[:300]
        return False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = chunk["error"].get("message", "stream error")
            continue
        for choice in chunk.get("choices", []):
            text = choice.get("delta", {}).get("content") if config.chat else choice.get("text")
            if text:
                result.ttft_s = result.ttft_s or time.perf_counter() - start
                pieces.append(text)
        if chunk.get("usage"):
            result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            result.output_tokens = chunk["usage"]["completion_tokens"]
        if drop_after is not None and len(pieces) >= drop_after:
            result.disconnected = True
            return False  # leaving the block closes the connection: the server sees the client go
    return False


async def send_one(client: httpx.AsyncClient, config: LoadConfig, index: int) -> RequestResult:
    prompt_index = index % config.prompt_pool if config.prompt_pool else index
    model = config.models[index % len(config.models)]
    result = RequestResult(index=index, prompt_index=prompt_index, model=model)
    drop_after = disconnect_after(config, index)
    prompt = prompt_of(config, prompt_index)
    body = {
        "model": model,
        **({"messages": [{"role": "user", "content": prompt}]} if config.chat else {"prompt": prompt}),
        "max_tokens": request_shape(config, prompt_index)[1],
        "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": f"loadgen-{index}",
    }
    pieces: list[str] = []
    start = time.perf_counter()
    try:
        path = "/v1/chat/completions" if config.chat else "/v1/completions"
        while True:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code == 429 and result.refused < config.retries:
                    result.refused += 1
                    wait_s = retry_after_s(response.headers.get("retry-after"))
                else:
                    done = await read_answer(response, result, config, pieces, start, drop_after)
                    break
            await asyncio.sleep(wait_s)
        if result.status != 200:
            return result
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(pieces)
        result.ok = done and not result.error and result.output_tokens > 0
        if not result.ok and not result.error and not result.disconnected:
            result.error = "stream ended without [DONE] or usage"
    except httpx.TimeoutException as err:
        result.hung = True
        result.error = f"{type(err).__name__}: no answer within {config.timeout_s:g} s"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run_load(config: LoadConfig) -> tuple[list[RequestResult], float]:
    """Send the configured load; returns the results (in index order) and the wall time."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency + 8)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    results: list[RequestResult] = []
    rng = random.Random(config.seed)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        def more(i: int) -> bool:
            if config.duration_s is not None:
                return time.perf_counter() - start < config.duration_s
            return i < config.requests

        if config.rate is None:
            counter = iter(range(1 << 62))

            async def worker() -> None:
                while more(i := next(counter)):
                    results.append(await send_one(client, config, i))

            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        else:
            gate = asyncio.Semaphore(config.concurrency)

            async def limited(i: int) -> None:
                async with gate:
                    results.append(await send_one(client, config, i))

            tasks, i = [], 0
            while more(i):
                tasks.append(asyncio.create_task(limited(i)))
                i += 1
                await asyncio.sleep(rng.expovariate(config.rate))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return sorted(results, key=lambda r: r.index), elapsed


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    array = np.asarray(values)
    p50, p90, p99 = (float(np.percentile(array, q)) for q in (50, 90, 99))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(array.mean())}


def summarize(
    config: LoadConfig,
    results: list[RequestResult],
    started: datetime,
    elapsed: float,
    elapsed_by_model: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The bench JSON: per variant counts, throughput, TTFT/TPOT/e2e quantiles and raw samples.

    Throughput is output tokens over `elapsed`, or for an interleaved run over the time spent on
    the model the variant answered for (`elapsed_by_model`)."""
    variants: dict[str, Any] = {}
    for name in sorted({r.variant or r.model for r in results}):
        mine = [r for r in results if (r.variant or r.model) == name]
        good = [r for r in mine if r.ok]
        dropped = sum(r.disconnected for r in mine)
        tokens = sum(r.output_tokens for r in good)
        seconds = elapsed_by_model[mine[0].model] if elapsed_by_model else elapsed
        samples = {
            "ttft_s": [r.ttft_s for r in good],
            "tpot_s": [t for r in good if (t := r.tpot_s) is not None],
            "e2e_s": [r.e2e_s for r in good],
        }
        variants[name] = {
            "requests": len(mine),
            "errors": len(mine) - len(good) - dropped,
            "disconnected": dropped,
            "hung": sum(r.hung for r in mine),
            "refused": sum(r.refused for r in mine),
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "ttft_s": _stats(samples["ttft_s"]),
            "tpot_s": _stats(samples["tpot_s"]),
            "e2e_s": _stats(samples["e2e_s"]),
            "samples": samples,
        }
    settings = asdict(config)
    settings.pop("api_key")
    settings["prompts"] = len(config.prompts)  # how many real prompts (0: made up), not their text
    return {
        "url": config.url,
        "started": started.isoformat(timespec="seconds"),
        "settings": settings,
        "method": method_of(config),
        "duration_s": elapsed,
        "variants": variants,
    }


def method_of(config: LoadConfig) -> str:
    """How the run measured, in words (the A/B report quotes it)."""
    load = f"concurrency {config.concurrency}" if config.rate is None else f"{config.rate:g} requests/s"
    shape = f"{config.prompt_tokens}-token prompts, {config.output_tokens} output tokens"
    if len(config.models) > 1 and config.rounds:
        per = -(-config.requests // config.rounds)
        return (
            f"{', '.join(config.models)} measured one at a time, interleaved: {config.rounds} rounds of {per} "
            f"requests each, the order rotated every round; {load}; {shape}; throughput per variant is its "
            "output tokens over the time spent on it"
        )
    return f"{', '.join(config.models)} in one run; {load}; {shape}"


def markdown(summary: dict[str, Any]) -> str:
    """One row per variant; times in ms."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [
        "| variant | requests | errors | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
        "| e2e p50/p90/p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        cols = ["/".join(ms(v[k][q]) for q in ("p50", "p90", "p99")) for k in ("ttft_s", "tpot_s", "e2e_s")]
        lines.append(
            f"| {name} | {v['requests']} | {v['errors']} | {v['output_tokens_per_s']:.1f} | " + " | ".join(cols) + " |"
        )
    return "\n".join(lines)


def run_interleaved(config: LoadConfig) -> tuple[list[RequestResult], float, dict[str, float]]:
    """Each model alone, round by round, the order rotated each round (see LoadConfig.rounds)."""
    per_round = -(-config.requests // config.rounds)
    results: list[RequestResult] = []
    elapsed: dict[str, float] = dict.fromkeys(config.models, 0.0)
    models = list(config.models)
    for r in range(config.rounds):
        for model in models[r % len(models) :] + models[: r % len(models)]:
            part = replace(config, models=(model,), requests=per_round, rounds=0, seed=config.seed + r)
            got, seconds = asyncio.run(run_load(part))
            for result in got:
                result.index += len(results)
            results += got
            elapsed[model] += seconds
    return results, sum(elapsed.values()), elapsed


def run_bench(config: LoadConfig) -> tuple[dict[str, Any], list[RequestResult]]:
    started = datetime.now(UTC)
    if len(config.models) > 1 and config.rounds:
        results, elapsed, by_model = run_interleaved(config)
    else:
        (results, elapsed), by_model = asyncio.run(run_load(config)), None
    failed = [r for r in results if not r.ok]
    if failed:
        log.warning(
            "%d of %d requests failed; first: %s %s", len(failed), len(results), failed[0].status, failed[0].error
        )
    return summarize(config, results, started, elapsed, by_model), results
