import pytest

from orionlm.bench import bench, format_table
from orionlm.config import preset
from orionlm.model import OrionLM


def test_bench_counts_every_token_and_formats_a_table():
    model = OrionLM(preset("tiny-moe")).eval()
    rows = bench(model, [1, 3], [8, 20], output_tokens=5, requests_per_client=2)
    assert [(r.input_len, r.concurrency) for r in rows] == [(8, 1), (8, 3), (20, 1), (20, 3)]
    for r in rows:
        assert r.aggregate > 0 and r.per_client > 0
        assert 0 < r.ttft[0] <= r.ttft[1] and 0 < r.itl[0] <= r.itl[1]
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| 8 | 1 |" in table[2] and "1.00x" in table[2]


def test_bench_command_refuses_what_does_not_fit(tmp_path):
    from orionlm.cli import main

    main(["init", str(tmp_path / "m"), "--preset", "tiny-dense"])
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tmp_path / "m"), "--input-lengths", "250", "--output-tokens", "10"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["bench", str(tmp_path / "m"), "--concurrency", "1,x"])
