"""Property test: any records either pass clean -> split -> format with counts that add up, or stop with a
one-line MedtuneError that names the file; nothing is lost or half-written."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtune.console import MedtuneError
from medtune.io import read_jsonl
from medtune.models import local_revision
from medtune.params import BaseParams, ModelParams
from medtune.splitting import SPLITS
from medtune.stages import clean, split
from medtune.stages import format as format_stage
from tests.helpers import clean_params, format_params, split_params

text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", "   ", "<b>bold</b> &amp; more", "What is X ?", "Topics", "é\u00a0\u200bü"]),
    st.text(alphabet="abcdefghij .?\n", min_size=40, max_size=400),
)
value = st.one_of(text, st.integers(), st.none(), st.lists(st.integers(), max_size=3))
record = st.fixed_dictionaries({"question": value, "answer": value, "focus": st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))})


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(record, min_size=1, max_size=40))
def test_random_records_pass_with_consistent_counts_or_fail_clearly(rows, tiny_model):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "raw").mkdir()
        (d / "raw" / "records.jsonl").write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate(rows)))
        try:
            c = clean.run(clean_params(min_answer_chars=10, max_drop_frac=1.0), d / "raw", d / "clean")
        except MedtuneError as e:
            assert "records.jsonl" in str(e) and "\n" not in str(e)
            assert not (d / "clean").exists()
            return
        assert c["rows_in"] == len(rows) == c["rows_out"] + sum(c["dropped"].values())
        try:
            s = split.run(split_params(group_by=["focus"]), BaseParams(seed=1), d / "clean", d / "split")
        except MedtuneError as e:
            assert "split is empty" in str(e) and not (d / "split").exists()
            return
        assert s["train"] + s["val"] + s["test"] == c["rows_out"]
        m = ModelParams(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3_base", trust_remote_code=False)
        try:
            f = format_stage.run(format_params(max_answer_tokens=32), m, d / "split", d / "fmt")
        except MedtuneError as e:
            assert "no examples left after formatting" in str(e) and ".jsonl" in str(e)
            assert not (d / "fmt").exists()
            return
        for name in SPLITS:
            rows_out = read_jsonl(d / "fmt" / f"{name}.jsonl")
            assert len(rows_out) == f[name]["rows"] == s[name] - f[name]["dropped_too_long"]
            assert all(r["completion"].endswith("<eos>") for r in rows_out)
