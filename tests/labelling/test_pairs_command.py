"""``prefl pairs`` end to end: a reward function, a reward-model export and a judge label toy
samples; the pairs are what an independent computation gives, and PreferenceDataModule loads them
as they are (and DPO takes a step on them); bad input is named; the predict loop runs on two
data-parallel processes with the same result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_samples

from prefl import DPOModule, PreferenceDataModule
from prefl.cli import main
from prefl.data.judging import judge_pairs, judge_request
from prefl.data.pairs import LabelCounts, comparisons, read_samples
from prefl.data.prompts import encode_prompt_list
from prefl.models import CausalLMSpec, build_causal_lm
from prefl.models.reward import RewardModel
from prefl.modules.judge import label_ids
from prefl.tasks import toy

QUIET = ["--accelerator", "cpu"]


@pytest.fixture(scope="module")
def toy_samples(tmp_path_factory) -> Path:
    """Six toy prompts with three completions each from the toy generator (seed 0)."""
    rng = random.Random(0)
    prompts = toy.split_prompts()[1][:6]
    rows = [
        {"prompt": p, "completions": [toy.sample_completion(p, rng) for _ in range(3)]}
        for p in prompts
    ]
    return write_samples(tmp_path_factory.mktemp("samples") / "samples.jsonl", rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_pairs(samples: Path, score, source: str) -> list[dict]:
    """Best against worst by ``score(prompts, completions)``, computed here on its own."""
    out = []
    for number, line in enumerate(samples.read_text().splitlines(), 1):
        row = json.loads(line)
        s = score([row["prompt"]] * len(row["completions"]), row["completions"])
        best, worst = s.index(max(s)), s.index(min(s))
        if s[best] != s[worst]:
            out.append(
                {
                    "prompt": row["prompt"],
                    "chosen": row["completions"][best],
                    "rejected": row["completions"][worst],
                    "margin": pytest.approx(s[best] - s[worst], abs=1e-5),
                    "source": source,
                    "id": f"samples.jsonl:{number}/{min(best, worst)}-{max(best, worst)}",
                }
            )
    return out


def test_reward_fn_end_to_end_and_dpo_reads_the_pairs(
    toy_samples, tmp_path, capsys, sft_dir, quiet_trainer
):
    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(toy_samples), "--out", str(out), "--reward-fn", "toy"])
    pairs = read_jsonl(out)
    assert pairs == expected_pairs(toy_samples, toy.oracle_rewards, "reward-fn:toy")
    ties = 6 - len(pairs)
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            f"prefl pairs: 6 prompts read, {len(pairs)} pairs written, {ties} ties, 0 rows "
            f"skipped -> {out}"
        )
    )
    assert len(pairs) >= 4
    dm = PreferenceDataModule(
        dataset=str(out), mode="pairs", val_split=None, batch_size=2, max_length=64
    )
    dm.setup("fit")
    assert dm.stats["train"]["used"] == len(pairs) and dm.stats["train"]["dropped"] == {}
    assert dm.datasets["train"]["margin"] == pytest.approx([p["margin"] for p in pairs])
    torch.manual_seed(0)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(DPOModule(sft_dir), datamodule=dm)
    assert trainer.global_step == 1


def test_reward_fn_by_module_path_sees_chat_prompts_rendered(tmp_path, chat_tok):
    """``label_rewards:word_count`` (this folder) with conversational samples: the function gets
    each prompt as the chat template renders it (as PPO gives it), and the pairs keep messages,
    which PreferenceDataModule reads with the same tokenizer."""
    import label_rewards

    tok_dir = tmp_path / "tok"
    chat_tok.save_pretrained(tok_dir)
    prompt = [{"role": "user", "content": "Can you help me?"}]
    samples = write_samples(
        tmp_path / "chat.jsonl",
        [{"prompt": prompt, "completions": ["Sure.", "Sure, I am happy to help.", "No"]}],
    )
    out = tmp_path / "pairs.jsonl"
    label_rewards.SEEN.clear()
    args = ["pairs", str(samples), "--out", str(out), "--reward-fn", "label_rewards:word_count"]
    main([*args, "--tokenizer", str(tok_dir), "--min-margin", "2"])
    rendered = encode_prompt_list(chat_tok, [prompt])[0][0]
    assert label_rewards.SEEN == [rendered] * 3
    assert rendered.startswith("<|im_start|>user\nCan you help me?")
    assert read_jsonl(out) == [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Sure, I am happy to help."}],
            "rejected": [{"role": "assistant", "content": "Sure."}],
            "margin": 5.0,
            "source": "reward-fn:label_rewards:word_count",
            "id": "chat.jsonl:1/0-1",
        },
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Sure, I am happy to help."}],
            "rejected": [{"role": "assistant", "content": "No"}],
            "margin": 5.0,
            "source": "reward-fn:label_rewards:word_count",
            "id": "chat.jsonl:1/1-2",
        },
    ]
    dm = PreferenceDataModule(dataset=str(out), tokenizer=chat_tok, mode="pairs", val_split=None)
    dm.setup("fit")
    assert dm.stats["train"]["used"] == 2


def test_reward_model_scores_through_the_predict_loop(toy_samples, tmp_path, rm_dir, capsys):
    """Margins are the reward differences that ``RewardModel.score`` gives the same texts."""
    rm = RewardModel.from_pretrained(rm_dir)
    out, scored = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    main(
        [
            "pairs",
            str(toy_samples),
            "--out",
            str(out),
            "--reward-model",
            rm_dir,
            *QUIET,
            "--batch-size",
            "4",
            "--scores-out",
            str(scored),
        ]
    )
    expected = expected_pairs(toy_samples, rm.score, f"reward-model:{rm_dir}")
    assert read_jsonl(out) == expected and len(expected) == 6
    rows = read_jsonl(scored)
    first = rm.score([rows[0]["prompt"]] * 3, rows[0]["completions"])
    assert rows[0]["scores"] == pytest.approx(first, abs=1e-5)
    assert not list(tmp_path.glob("*.predict.jsonl*"))  # the ranks' scratch files are gone
    assert "6 pairs written, 0 ties" in capsys.readouterr().out


def test_a_causal_lm_is_refused_as_a_reward_model(toy_samples, tmp_path, sft_dir):
    with pytest.raises(SystemExit, match="not a sequence classifier with one label"):
        main(
            [
                "pairs",
                str(toy_samples),
                "--out",
                str(tmp_path / "p.jsonl"),
                "--reward-model",
                sft_dir,
            ]
        )


#: A judge template with the first answer last, so that it weighs most on the next token.
JUDGE = "Which is better, A or B?\n[B] {second}\n[Question] {prompt}\n[A] {first}"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWERS = ["Paris.", "Paris is the capital of France.", "I don't know, sorry.", "Bread."]


def next_logits(model, tokenizer, requests) -> torch.Tensor:
    """The next-token logits ``(N, V)`` after each judge request, one unpadded forward each."""
    with torch.no_grad():
        rows = [encode_prompt_list(tokenizer, [r])[1] for r in requests]
        return torch.stack([model(torch.tensor(ids)).logits[0, -1] for ids in rows])


@pytest.fixture(scope="module")
def judge(tmp_path_factory, chat_tok):
    """A random-init 2-layer Llama with the ChatML tokenizer, saved, and two labels for it.

    A random judge's preference is mostly a constant shift: with the labels "A" and "B" it
    prefers one position for every input, and every comparison is a tie. So the labels are two
    tokens chosen here whose logit difference changes sign across the judge's requests, on 1 to
    5 of the 6 comparisons consistently in both orders (the widest such pair): the verdicts then
    depend on the answers, and some are kept, some are ties.
    """
    torch.manual_seed(3)
    model = build_causal_lm(CausalLMSpec(config="toy"), chat_tok).eval()
    out = tmp_path_factory.mktemp("judge")
    model.save_pretrained(out)
    chat_tok.save_pretrained(out)
    pairs = comparisons(ANSWERS)
    requests = [judge_request(JUDGE, QUESTION, ANSWERS[i], ANSWERS[j]) for i, j in pairs]
    requests += [judge_request(JUDGE, QUESTION, ANSWERS[j], ANSWERS[i]) for i, j in pairs]
    logits = next_logits(model, chat_tok, requests)
    text = [chat_tok.decode([u]) for u in range(logits.shape[1])]
    words = torch.tensor(
        [chat_tok.encode(t, add_special_tokens=False)[:1] == [u] for u, t in enumerate(text)]
    )  # a label must tokenize back to u
    best = (0.0, 0, 0)
    for u in torch.nonzero(words).flatten().tolist():
        diff = logits[:, u : u + 1] - logits
        xy, yx = diff[: len(pairs)], diff[len(pairs) :]
        agree = (((xy > 0) & (yx < 0)) | ((xy < 0) & (yx > 0))).sum(0)
        width = torch.minimum(xy.abs(), yx.abs()).min(0).values
        width[(agree < 1) | (agree >= len(pairs)) | ~words] = 0
        if float(width.max()) > best[0]:
            best = (float(width.max()), u, int(width.argmax()))
    labels = [text[best[1]], text[best[2]]]
    assert best[0] > 1e-3 and label_ids(chat_tok, labels) == list(best[1:])
    return out, labels


def test_judge_end_to_end_matches_the_rule_on_direct_forwards(tmp_path, judge, chat_tok):
    """The pairs of ``--judge`` (a template and labels of our own) equal :func:`judge_pairs` with
    each request's ``p_first`` from a plain forward of the same model, one request at a time;
    kept pairs and ties both occur."""
    judge_dir, labels = judge
    samples = write_samples(tmp_path / "chat.jsonl", [{"prompt": QUESTION, "completions": ANSWERS}])
    template = tmp_path / "judge.txt"
    template.write_text(JUDGE)
    out = tmp_path / "pairs.jsonl"
    main(
        [
            "pairs",
            str(samples),
            "--out",
            str(out),
            "--judge",
            str(judge_dir),
            *QUIET,
            "--min-margin",
            "0",
            "--batch-size",
            "5",
            "--judge-template",
            str(template),
            "--judge-labels",
            *labels,
        ]
    )
    model = build_causal_lm(CausalLMSpec(name_or_path=str(judge_dir)), chat_tok).eval()
    ids = label_ids(chat_tok, labels)

    def direct(requests):
        return next_logits(model, chat_tok, requests)[:, ids].softmax(-1)[:, 0].tolist()

    counts = LabelCounts()
    rows = read_samples([samples], counts)
    expected = judge_pairs(rows, direct, counts, JUDGE, min_margin=0.0)[0]
    got = read_jsonl(out)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for p in got] == [
        (ANSWERS[c], ANSWERS[r], pytest.approx(m, abs=1e-5)) for c, r, m in expected
    ]
    assert 0 < len(got) < 6 and counts.ties == 6 - len(got)
    assert all(p["source"] == f"judge:{judge_dir}" for p in got)


def test_a_malformed_line_stops_the_command_naming_file_and_line(tmp_path):
    samples = tmp_path / "bad.jsonl"
    samples.write_text('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "p",\n')
    with pytest.raises(SystemExit) as stop:
        main(["pairs", str(samples), "--out", str(tmp_path / "p.jsonl"), "--reward-fn", "toy"])
    assert str(stop.value).startswith(
        f"prefl pairs: error: dataset file '{samples}', line 2: invalid JSON at column"
    )
    assert not (tmp_path / "p.jsonl").exists()


def test_an_empty_completion_list_is_counted(tmp_path, capsys):
    samples = write_samples(
        tmp_path / "s.jsonl",
        [
            {"prompt": "the movie was", "completions": []},
            {"prompt": "the movie was", "completions": ["great fun", "awful mess"]},
        ],
    )
    main(["pairs", str(samples), "--out", str(tmp_path / "p.jsonl"), "--reward-fn", "toy"])
    assert (
        capsys.readouterr()
        .out.strip()
        .startswith(
            "prefl pairs: 2 prompts read, 1 pairs written, 0 ties, 1 rows skipped "
            "(1 no completions)"
        )
    )


def test_help_names_the_new_subcommands():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "prefl", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "{fit,validate,test,predict" in run.stdout
    assert "prefl pairs SAMPLES --out PAIRS.jsonl" in run.stdout
    assert "prefl label SAMPLES --out PAIRS.jsonl" in run.stdout
    code = "import sys; from prefl.cli import main; main(['pairs', '--help'])"
    run = subprocess.run([sys.executable, "-c", f"{code}\n"], capture_output=True, text=True)
    assert run.returncode == 0 and "--reward-model PATH" in run.stdout
    code = "import sys, prefl.cli; prefl.cli.pairs_parser(); print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


@pytest.mark.slow
def test_two_data_parallel_processes_give_the_same_pairs(toy_samples, tmp_path, rm_dir):
    """``--devices 2`` on CPU (DDP, 18 texts, batch 4: the sampler pads 2 repeats) writes the
    pairs that one process writes, margins to float32 rounding."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    main(
        [
            "pairs",
            str(toy_samples),
            "--out",
            str(one),
            "--reward-model",
            rm_dir,
            *QUIET,
            "--batch-size",
            "4",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefl",
            "pairs",
            str(toy_samples),
            "--out",
            str(two),
            "--reward-model",
            rm_dir,
            *QUIET,
            "--devices",
            "2",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("prefl pairs: 6 prompts read") == 1  # rank 0 alone
    a, b = read_jsonl(one), read_jsonl(two)
    assert [{**p, "margin": pytest.approx(p["margin"], abs=1e-5)} for p in a] == b
