"""CPU checks of graph_memsets' graph editing against a fake CUDA driver (the real driver and kernel are checked
by tests/test_graph_memsets_gpu.py on the GPU machines).

The fake holds a graph of nodes with dependency edges; the rewrite must give every memset node's place to a
kernel node with the memset's parameters, keep the order of what came before and after, and leave the graph
correct when an edit fails."""

from __future__ import annotations

import ctypes

import pytest

from comfy.taco_dit.utils import graph_memsets

KERNEL, MEMSET = 0, 2


class FakeDriver:
    def __init__(self, nodes: dict, edges: set, memsets: dict, fail_dependencies: bool = False):
        self.types, self.edges, self.memsets = dict(nodes), set(edges), memsets
        self.kernels: dict = {}
        self.fail_dependencies = fail_dependencies
        self.next_id = 1000

    @staticmethod
    def _set(ref, value):
        ref._obj.value = value

    def cuGraphGetNodes(self, graph, out, count):
        if out is not None:
            for i, n in enumerate(sorted(self.types)):
                out[i] = n
        self._set(count, len(self.types))
        return 0

    def cuGraphNodeGetType(self, node, kind):
        self._set(kind, self.types[node.value])
        return 0

    def cuGraphMemsetNodeGetParams(self, node, params):
        for k, v in self.memsets[node.value].items():
            setattr(params._obj, k, v)
        return 0

    def _query(self, found, out, count):
        if out is not None:
            for i, n in enumerate(found):
                out[i] = n
        self._set(count, len(found))
        return 0

    def cuGraphNodeGetDependencies_v2(self, node, out, edge_data, count):
        return self._query(sorted(a for a, b in self.edges if b == node.value), out, count)

    def cuGraphNodeGetDependentNodes_v2(self, node, out, edge_data, count):
        return self._query(sorted(b for a, b in self.edges if a == node.value), out, count)

    def cuGraphAddKernelNode_v2(self, new, graph, deps, n, params):
        p = params._obj
        self.next_id += 1
        nid = self.next_id
        args = [ctypes.cast(p.kernelParams[i], ctypes.POINTER(t)).contents.value
                for i, t in enumerate((ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.c_uint64, ctypes.c_uint64))]
        self.kernels[nid] = {"grid": p.gridDimX, "block": p.blockDimX, "args": args, "func": p.func}
        self.types[nid] = KERNEL
        self.edges |= {(deps[i], nid) for i in range(n.value)}
        self._set(new, nid)
        return 0

    def cuGraphAddDependencies_v2(self, graph, frm, to, edge_data, n):
        if self.fail_dependencies:
            return 999
        self.edges |= {(frm[i], to[i]) for i in range(n.value)}
        return 0

    def cuGraphDestroyNode(self, node):
        nid = node.value
        del self.types[nid]
        self.edges = {(a, b) for a, b in self.edges if nid not in (a, b)}
        return 0


@pytest.fixture
def fake(monkeypatch):
    def install(driver: FakeDriver) -> FakeDriver:
        monkeypatch.setitem(graph_memsets._state, "cuda", driver)
        monkeypatch.setitem(graph_memsets._state, "functions", {0: ctypes.c_void_p(0xF00)})
        return driver
    return install


def test_a_memset_between_kernels_becomes_a_kernel_node_in_its_place(fake):
    # 1 -> 2 (memset, 1-D: 1001 bytes of 0xAB) -> 3, and 1 -> 4 (memset, 2-D: 5 rows of 9 words, pitch 64) -> 3
    drv = fake(FakeDriver({1: KERNEL, 2: MEMSET, 3: KERNEL, 4: MEMSET}, {(1, 2), (2, 3), (1, 4), (4, 3)},
                          {2: dict(dst=0x1000, pitch=0, value=0xAB, elementSize=1, width=1001, height=1),
                           4: dict(dst=0x2000, pitch=64, value=7, elementSize=4, width=9, height=5)}))
    assert graph_memsets.replace_memsets(ctypes.c_void_p(1), 0) == 2
    assert MEMSET not in drv.types.values()
    by_dst = {k["args"][0]: (nid, k) for nid, k in drv.kernels.items()}
    one, k1 = by_dst[0x1000]
    assert k1["args"] == [0x1000, 0, 0xAB, 1, 1001, 1001]
    assert k1["grid"] * k1["block"] >= 1001 > (k1["grid"] - 1) * k1["block"] and k1["func"] == 0xF00
    two, k2 = by_dst[0x2000]
    assert k2["args"] == [0x2000, 64, 7, 4, 9, 45]
    assert drv.edges == {(1, one), (one, 3), (1, two), (two, 3)}
    assert graph_memsets.largest_replaced() >= 180


def test_an_edit_that_fails_leaves_no_unordered_node(fake):
    drv = fake(FakeDriver({1: KERNEL, 2: MEMSET, 3: KERNEL}, {(1, 2), (2, 3)},
                          {2: dict(dst=0x1000, pitch=0, value=0, elementSize=4, width=1, height=1)},
                          fail_dependencies=True))
    with pytest.raises(RuntimeError, match="cuGraphAddDependencies"):
        graph_memsets.replace_memsets(ctypes.c_void_p(1), 0)
    assert drv.types == {1: KERNEL, 2: MEMSET, 3: KERNEL}  # the new kernel node was removed again
    assert drv.edges == {(1, 2), (2, 3)}


def test_memsets_it_cannot_express_are_left_alone(fake):
    drv = fake(FakeDriver({1: MEMSET, 2: MEMSET}, set(),
                          {1: dict(dst=0x10, pitch=0, value=0, elementSize=8, width=4, height=1),
                           2: dict(dst=0x20, pitch=0, value=0, elementSize=4, width=0, height=1)}))
    assert graph_memsets.replace_memsets(ctypes.c_void_p(1), 0) == 0
    assert drv.types == {1: MEMSET, 2: MEMSET}


def test_keep_turns_the_rewrite_off(monkeypatch):
    monkeypatch.setenv("TACO_GRAPH_MEMSETS", "keep")
    assert not graph_memsets.enabled()
    monkeypatch.setenv("TACO_GRAPH_MEMSETS", "kernel")
    assert graph_memsets.enabled()
