"""The batch job as users run it: a subprocess, real model, JSONL in and out, clear one-line errors (the
refused flags' table runs all but its first case in the worker: tests/cli_inprocess.py)."""

import json

import pytest

from tests.cli_inprocess import run_front_end

STORIES = [  # one device: the CLI's behaviour, not sharding, is under test here (2x4 is covered elsewhere)
    "--model",
    "tests/data/stories260K/stories260K.bin",
    "--mesh",
    "1x1",
    "--max-context",
    "128",
    "--max-slots",
    "2",
    "--prefill-chunk",
    "8",
    "--min-bucket",  # one step shape (8 tokens) to compile instead of four
    "8",
]


def run(args, timeout=300):
    return run_front_end("jaxinfer.run", args, None, in_process=False, timeout=timeout)


def errors(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


BAD_FLAGS = [
    (["--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--temperature", "-1"], "temperature=-1.0 must be a number >= 0"),
    (["--mesh", "2x"], "--mesh '2x': expected DATAxTENSOR"),
    (["--mesh", "data=2,model=4"], "unknown axis 'model'"),
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file or directory"),
    (
        [*STORIES, "--mesh", "1x2x4", "--kv-pages", "3"],  # the last --mesh wins
        "--kv-pages 3 is below the 4 pages per shard one request of --max-context 128 needs "
        "(its 8 pages over 2 sequence shards)",
    ),
    ([*STORIES, "--min-bucket", "0"], "--min-bucket 0 must be >= 1"),  # the last --min-bucket wins
    (["--input", "missing.jsonl"], "--input missing.jsonl: no such file"),
    (["--compile-cache", "README.md"], "--compile-cache README.md: exists and is not a directory"),
    # an --output that cannot be written is refused before the job runs, not after (its results lost)
    (["--input", "examples/prompts.jsonl", "--output", "/tmp"], "--output /tmp: is a directory"),
    (
        ["--input", "examples/prompts.jsonl", "--output", "/nonexistent/out.jsonl"],
        "--output /nonexistent/out.jsonl: cannot write a file in /nonexistent",
    ),
    (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer /nonexistent/tok.model: no such file or directory"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS)
def test_bad_flags_give_one_line_and_exit_2(args, message, capfd):
    # the first case as a real process, the others in this one (tests/cli_inprocess.py)
    code, _, stderr = run_front_end("jaxinfer.run", args, capfd, in_process=args != BAD_FLAGS[0][0])
    assert "start-up" not in stderr, "refused before any step is compiled"  # (not timed: machines differ 2x)
    assert code == 2
    assert "Traceback" not in stderr
    assert any(message in line for line in errors(stderr)), stderr[-2000:]


def test_jsonl_bad_lines_are_reported_and_others_run(tmp_path):
    long_prompt = "Once upon a time " * 80  # ~400 tokens, above --max-context 128
    lines = [
        json.dumps({"id": "good", "prompt": "Once upon a time", "max_tokens": 12}),
        '{"prompt": "broken", ',
        json.dumps({"prompt": "Hi", "temprature": 0.5}),
        json.dumps({"prompt": "Hi", "top_p": 1.5}),
        json.dumps({"prompt": "Hi", "temperature": -0.1}),
        json.dumps({"id": "long", "prompt": long_prompt}),
        json.dumps({"id": "sampled", "prompt": "The cat", "temperature": 0.8, "seed": 3, "max_tokens": 8}),
        json.dumps({"prompt": "Hi", "logit_bias": {"600": 5}}),
        json.dumps({"prompt": "Hi", "presence_penalty": 2.5}),
        json.dumps(
            {
                "id": "scored",
                "prompt": "The cat",
                "max_tokens": 3,
                "prompt_logprobs": 2,
                "top_logprobs": 2,
                "logprobs": True,
            }
        ),
        json.dumps({"id": "good", "prompt": "Hi"}),  # each record is matched to its request by id
        json.dumps({"id": "1", "prompt": "Hi"}),  # line 2's id: a refused line's record keeps its default id
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    code, _, stderr = run([*STORIES, "--no-chat", "--input", str(src), "--output", str(out)])
    assert code == 2 and "Traceback" not in stderr
    errs = errors(stderr)
    assert any("line 2: malformed JSON" in e for e in errs)
    assert any("line 3: unknown sampling parameter 'temprature'" in e for e in errs)
    assert any("line 4: top_p=1.5 must be in (0, 1]" in e for e in errs)
    assert any("line 5: temperature=-0.1 must be a number >= 0" in e for e in errs)
    assert any(
        "line 6: prompt: the prompt is" in e and "above the limit of 127" in e and "--truncate" in e for e in errs
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = ["good", "1", "2", "3", "4", "long", "sampled", "7", "8", "scored", "good", "1"]
    assert [r["id"] for r in records] == ids
    assert any("""line 11: "id" 'good' repeats line 1's: each request needs its own""" in e for e in errs)
    assert any("""line 12: "id" '1' repeats line 2's""" in e for e in errs)
    assert all("error" in r for r in records[10:])
    good = records[0]
    assert good["text"].startswith(", there was a little girl named Lily")
    assert good["finish_reason"] == "length" and good["usage"]["completion_tokens"] == 12
    assert len(good["token_ids"]) == 12 and good["timings"]["ttft_s"] > 0
    assert all("error" in r for r in records[1:6] + records[7:9])
    assert records[6]["usage"]["completion_tokens"] == 8
    assert any("line 8: logit_bias has token 600: must be a token id in [0, 512)" in e for e in errs)
    assert any("line 9: presence_penalty=2.5 must be a number in [-2, 2]" in e for e in errs)
    scored = records[9]
    assert scored["prompt_logprobs"][0] is None and len(scored["prompt_logprobs"]) == scored["usage"]["prompt_tokens"]
    assert all(len(top) == 2 for top in scored["prompt_top_logprobs"][1:]) and len(scored["top_logprobs"]) == 3
    assert scored["top_logprobs"][0][0][0] == scored["token_ids"][0]  # greedy: the sampled token is the most likely
    assert "TTFT ms p50" in stderr and "output tokens/s" in stderr


def test_truncate_keeps_the_end_of_long_prompts(tmp_path):
    out = tmp_path / "out.jsonl"
    code, _, stderr = run(
        [
            *STORIES,
            "--no-chat",
            "--truncate",
            "--max-tokens",
            "4",
            "--prompt",
            "Once upon a time " * 80,
            "--output",
            str(out),
        ]
    )
    assert code == 0, stderr[-2000:]
    record = json.loads(out.read_text())
    # 127 prompt tokens fill --max-context 128 but for the one token that ends the request by length
    assert record["usage"]["prompt_tokens"] == 127 and record["usage"]["completion_tokens"] == 1
    assert record["finish_reason"] == "length"


def test_a_request_without_seed_reports_one_that_reproduces_it(tmp_path):
    """Sampled requests without a seed draw one from the OS and report it; rerunning with it gives the same tokens."""
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 24}) + "\n"
            for i in range(3)
        )
    )
    first, again = tmp_path / "first.jsonl", tmp_path / "again.jsonl"
    code, _, stderr = run([*STORIES, "--no-chat", "--input", str(src), "--output", str(first)])
    assert code == 0, stderr[-2000:]
    records = [json.loads(line) for line in first.read_text().splitlines()]
    seeds = [r["seed"] for r in records]
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds) and len(set(seeds)) == 3
    assert len({tuple(r["token_ids"]) for r in records}) > 1, "three draws, one text: the seeds were not used"
    src.write_text(
        "".join(
            json.dumps(
                {"id": r["id"], "prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 24, "seed": r["seed"]}
            )
            + "\n"
            for r in records
        )
    )
    code, _, stderr = run([*STORIES, "--no-chat", "--input", str(src), "--output", str(again)])
    assert code == 0, stderr[-2000:]
    rerun = [json.loads(line) for line in again.read_text().splitlines()]
    assert [r["token_ids"] for r in rerun] == [r["token_ids"] for r in records]
    assert [r["seed"] for r in rerun] == seeds
