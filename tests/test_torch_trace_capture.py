"""pytest attaches its log capture to every non-propagating logger, and torch's structured-trace
logger `torch.__trace` emits whenever it holds a handler: a failing model check printed 45 DEBUG lines
of torch.export graph dumps (from the ONNX check's exporter) under "Captured log call". The plugin
keeps pytest's handlers off it (equivcheck.session.quiet_torch_trace)."""
from __future__ import annotations

pytest_plugins = ["pytester"]

EXPORTS_THEN_FAILS = '''
import torch

def test_export():
    torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))

def test_then_fails():
    torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    assert False, "a failure whose report must not carry torch's trace"
'''


def test_a_failure_after_torch_export_carries_no_torch_trace(pytester):
    pytester.makepyfile(test_exports=EXPORTS_THEN_FAILS)
    out = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    out.assert_outcomes(passed=1, failed=1)
    text = out.stdout.str()
    assert "a failure whose report must not carry" in text
    assert "torch.__trace" not in text
