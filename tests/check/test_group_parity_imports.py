"""The local proof of a sharded fold (:mod:`normfold.check.group_parity`) is of the check layer:
it imports nothing of the file layer (``normfold.io``); the heap helper it shares with the writer
and the low-precision dtypes are neutral modules (as ``normfold.errors``) importing no normfold."""

from __future__ import annotations

from test_layout import _graph


def test_the_group_proof_does_not_depend_on_the_io_layer() -> None:
    graph = _graph()
    assert [str(e) for e in graph["normfold.check.group_parity"] if e.target.startswith("normfold.io")] == []
    assert {"normfold.heap", "normfold.dtypes"} <= {e.target for e in graph["normfold.check.group_parity"]}
    for neutral in ("normfold.heap", "normfold.dtypes"):
        assert [str(e) for e in graph[neutral] if e.target.startswith("normfold")] == []
