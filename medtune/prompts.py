"""How a row becomes the text the model sees: the one renderer of prompts and completions (format writes its
output; evaluate, merge's check, check, chat, serve and ui prompt the model with it), and the one rule of which
tokens training learns (the prompt's are masked; the answer's and its end token carry the loss).

Layouts (`format.template`): `chat` (the model's chat template, `model.chat_template`), `alpaca`
(### Instruction / ### Input / ### Response), `qa` (### Question / ### Answer) and `mcq` (question,
lettered options; the answer starts "Answer: <letter>. <option>" then "Explanation: ..."). Non-chat layouts
end the completion with the tokenizer's eos token. Multiple-choice rows use the same answer text in every
layout, so evaluation can parse the chosen letter; multi-turn rows render all earlier turns into the prompt.
"""

from __future__ import annotations

from medtune.console import MedtuneError
from medtune.hashing import unit_hash
from medtune.models import end_of_turn
from medtune.params import MIN_ANSWER_TOKENS, Disclaimer, FormatParams

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def cut_answer(tok, answer: str, max_tokens: int, ids: list[int] | None = None) -> tuple[str, bool]:
    """Cut at a sentence end so the model learns complete answers that stop, not mid-sentence ones. `ids`: the
    answer's tokens, when the caller tokenized many answers at once."""
    if ids is None:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return answer, False
    head = tok.decode(ids[:max_tokens])
    end = max(head.rfind(". "), head.rfind(".\n"), head.rfind("? "), head.rfind("! "))
    return (head[: end + 1] if end > len(head) // 2 else head.rstrip()), True


def answer_text(row: dict) -> str:
    """The target text: the answer, or for multiple choice the letter, the option and the explanation."""
    if "correct" not in row:
        return row["answer"]
    text = f"Answer: {row['correct']}. {row['answer']}"
    return text + (f"\nExplanation: {row['explanation']}" if row.get("explanation") else "")


def gets_disclaimer(d: Disclaimer, row_id: str) -> bool:
    return d.enabled and unit_hash("disclaimer", row_id) < d.fraction


def add_disclaimer(d: Disclaimer, answer: str) -> str:
    return f"{d.text}\n\n{answer}" if d.position == "start" else f"{answer}\n\n{d.text}"


def user_text(row: dict) -> str:
    text = "\n\n".join(x for x in (row.get("instruction"), row.get("context"), row["question"]) if x)
    return text + ("\n\n" + options_text(row) if row.get("options") else "")


def options_text(row: dict) -> str:
    return "\n".join(f"{k}. {v}" for k, v in row["options"].items())


def plain_prompt(p: FormatParams, row: dict, history: list[dict]) -> str:
    """The non-chat layouts, up to where the answer starts."""
    head = [p.system_prompt] if p.system_prompt else []
    if p.template == "qa":
        turns = [(m["role"], m["content"]) for m in history if m["role"] != "system"] or [("user", user_text(row))]
        body = "".join(f"### {'Question' if r == 'user' else 'Answer'}:\n{c}\n\n" for r, c in turns)
        return "\n\n".join(head + [body + "### Answer:\n"])
    if any(m["role"] == "assistant" for m in history):
        raise MedtuneError(f"format.template={p.template}: row {row['id']!r} is a multi-turn dialogue; use chat or qa")
    if p.template == "mcq":
        if not row.get("options"):
            raise MedtuneError(f"format.template=mcq: row {row['id']!r} has no options; use chat, alpaca or qa")
        context = "\n\n".join(x for x in (row.get("instruction"), row.get("context")) if x)
        return "\n\n".join(head + ([context] if context else []) + [f"Question: {row['question']}\n{options_text(row)}\n"])
    task = row.get("instruction") or row["question"]
    rest = [row.get("context")] + ([row["question"]] if row.get("instruction") else []) + [options_text(row) if row.get("options") else None]
    given = "\n\n".join(x for x in rest if x)
    parts = head or [ALPACA_HEADER]
    return "\n\n".join(parts + [f"### Instruction:\n{task}"] + ([f"### Input:\n{given}"] if given else []) + ["### Response:\n"])


def chat_messages(p: FormatParams, row: dict) -> list[dict]:
    """The conversation up to the answer: the row's earlier turns, or the system prompt and the question."""
    if row.get("messages"):
        msgs = row["messages"][:-1]
        has_system = any(m["role"] == "system" for m in msgs)
        return msgs if has_system or not p.system_prompt else [{"role": "system", "content": p.system_prompt}] + msgs
    return ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [{"role": "user", "content": user_text(row)}]


def strip_bos(tok, prompt: str) -> str:
    """The tokenizer adds BOS by itself; a BOS in the text would make two."""
    bos = tok.bos_token
    if bos and prompt.startswith(bos) and adds_bos(tok):
        return prompt[len(bos):]
    return prompt


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS in front of what it encodes (asked once per tokenizer: a call costs ms)."""
    if getattr(tok, "_medtune_adds_bos", None) is None:
        tok._medtune_adds_bos = tok("x")["input_ids"][:1] == [tok.bos_token_id]
    return tok._medtune_adds_bos


def render(tok, p: FormatParams, row: dict, answer: str | None = None) -> tuple[str, str]:
    """(prompt, completion) for a canonical row; with answer=None only the prompt is meaningful (completion "").

    For chat, prompt + completion == the chat template's full conversation, minus the BOS text that the
    tokenizer adds by itself; the completion ends with the template's end-of-turn token."""
    if p.template != "chat":
        prompt = plain_prompt(p, row, row.get("messages", [])[:-1])
        return prompt, "" if answer is None else answer + tok.eos_token
    msgs = chat_messages(p, row)
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if answer is None:
        return strip_bos(tok, prompt), ""
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise MedtuneError("format: the chat template renders the prompt differently alone and before an answer; "
                           "choose another model.chat_template")
    completion = full[len(prompt):].rstrip()
    eot = end_of_turn(tok)
    if not completion.endswith(eot):
        completion += eot
    return strip_bos(tok, prompt), completion


def format_rows(tok, p: FormatParams, rows: list[dict], max_answer_tokens: list[int]) -> list[dict]:
    """Each row rendered with its answer cut to its budget, and its token counts. The tokenizer runs on all rows
    at once (fast tokenizers batch in parallel): one call for the answers, one for the prompts, one for the
    whole examples; the chat template renders row by row."""
    answers = [answer_text(r) for r in rows]
    answer_ids = tok(answers, add_special_tokens=False)["input_ids"] if rows else []
    out = []
    for row, answer, ids, budget in zip(rows, answers, answer_ids, max_answer_tokens):
        body, cut = cut_answer(tok, answer, budget, ids)
        disclaimed = gets_disclaimer(p.disclaimer, str(row["id"]))
        prompt, completion = render(tok, p, row, add_disclaimer(p.disclaimer, body) if disclaimed else body)
        meta = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(meta | {"question": row["question"], "reference": answer, "prompt": prompt, "completion": completion,
                           "disclaimer": disclaimed, "answer_truncated": cut})
    if out:
        prompts = tok([o["prompt"] for o in out])["input_ids"]
        fulls = tok([o["prompt"] + o["completion"] for o in out])["input_ids"]
        for o, a, b in zip(out, prompts, fulls):
            o |= {"n_prompt_tokens": len(a), "n_tokens": len(b)}
    return out


def format_row(tok, p: FormatParams, row: dict, max_answer_tokens: int) -> dict:
    return format_rows(tok, p, [row], [max_answer_tokens])[0]


def cut_tokens(tok, out: dict, max_length: int) -> dict:
    """Cut prompt + completion at max_length tokens, as trl's truncation does: the end-of-turn token goes with
    the tail. Marked `cut_at_max_length` so train's end-token check knows it is meant."""
    n_prompt = out["n_prompt_tokens"]
    ids = tok(out["prompt"] + out["completion"])["input_ids"]
    keep = max_length - n_prompt
    while keep > 0:  # decoding and re-tokenising can merge tokens at the cut: step back until it fits
        completion = tok.decode(ids[n_prompt:n_prompt + keep])
        n_tokens = len(tok(out["prompt"] + completion)["input_ids"])
        if n_tokens <= max_length:
            return out | {"completion": completion, "n_tokens": n_tokens, "answer_truncated": True, "cut_at_max_length": True}
        keep -= 1
    return out


def question_prompt(tok, p: FormatParams, question: str) -> str:
    """The prompt for a question asked on its own (chat, serve, ui, the choice test): a row with only a question."""
    return render(tok, p, {"id": "question", "question": question})[0]


def trained_tokens(tok, rows: list[dict]) -> list[dict]:
    """Each row as training sees it: `ids` of prompt + completion, of which the first `n_prompt` are the prompt's
    (masked: no loss) and the rest, the answer and its end token, carry the loss. `prefix_ok`: the prompt
    tokenises the same alone (as generation sees it) as before its answer (as training sees it)."""
    fulls = tok([r["prompt"] + r["completion"] for r in rows])["input_ids"]  # batched: the fast tokenizer runs in parallel
    prompts = tok([r["prompt"] for r in rows])["input_ids"]
    return [{"ids": f, "n_prompt": len(p), "prefix_ok": f[: len(p)] == p} for f, p in zip(fulls, prompts)]


def format_split(tok, p: FormatParams, rows: list[dict], source, keep_long: bool) -> tuple[list[dict], dict]:
    """Render one split's rows; over-long examples are dropped, shortened or cut as `format.overflow` says, except
    with `keep_long` (test: generation needs only the prompt). Returns (rows, counts)."""
    out_rows = []
    count = {"answers_truncated": 0, "over_max_length": 0, "dropped_too_long": 0, "truncated_to_fit": 0}
    budget = p.max_answer_tokens if p.overflow != "cut" else 10**9  # "cut": no sentence cut; only trl's, at max_length
    try:
        first = format_rows(tok, p, rows, [budget] * len(rows))
    except MedtuneError as e:
        raise MedtuneError(f"{source}: {e}") from None
    for r, out in zip(rows, first):
        if out["n_tokens"] > p.max_length:
            count["over_max_length"] += 1
            if not keep_long:
                budget = p.max_answer_tokens
                while (p.overflow == "truncate" and out["n_tokens"] > p.max_length
                       and (budget := budget - (out["n_tokens"] - p.max_length)) >= MIN_ANSWER_TOKENS):
                    out = format_row(tok, p, r, budget)
                if p.overflow == "cut":
                    out = cut_tokens(tok, out, p.max_length)
                if out["n_tokens"] > p.max_length:
                    count["dropped_too_long"] += 1
                    continue
                count["truncated_to_fit"] += 1
        count["answers_truncated"] += out["answer_truncated"]
        out_rows.append(out)
    if not out_rows:
        raise MedtuneError(f"{source}: no examples left after formatting (format.max_length={p.max_length})")
    count |= {"rows": len(out_rows), "with_disclaimer": sum(r["disclaimer"] for r in out_rows),
              "mean_tokens": round(sum(r["n_tokens"] for r in out_rows) / len(out_rows), 1)}
    return out_rows, count
