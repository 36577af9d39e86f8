"""The bundled task's data: the shipped splits are exactly what the seeded generator writes."""

from lm_eval_dllm.tasks import modchain


def test_shipped_splits_are_the_generators_output():
    taken: set[str] = set()
    for split in ("test", "validation", "train"):
        n, seed = modchain.SPLITS[split]
        docs = modchain.generate(n, seed, exclude=taken)
        taken |= {d["question"] for d in docs}
        assert modchain.load_split(split) == docs, split
    assert len(taken) == sum(n for n, _ in modchain.SPLITS.values())  # disjoint splits


def test_the_chain_stops_at_its_first_zero():
    assert modchain.solve("3+7*4-2") == "3+7=0\n#### 0"
    assert modchain.solve("3+8*4-2") == "3+8=1\n1*4=4\n4-2=2\n#### 2"
    lines = set()
    for d in modchain.load_split("test"):
        steps = d["answer"].split("\n")[:-1]
        results = [s.split("=")[1] for s in steps]
        assert "0" not in results[:-1]  # no earlier result is 0
        assert results[-1] == "0" or len(steps) == len(d["question"]) // 2  # stopped at 0 or ran out
        lines.add(len(steps))
    assert lines == set(range(1, modchain.MAX_OPS + 1))  # where the answer ends varies
