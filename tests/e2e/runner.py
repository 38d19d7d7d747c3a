"""The runner both e2e scripts share: every `test_*` function of a module, in definition order."""

import traceback

import openai


def run(namespace):
    """Run the `test_*` callables of `namespace` (a module's globals()); 1 if any failed, else 0."""
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"ok      {name}")
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAILED  {name}")
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed (openai {openai.__version__})")
    return 1 if failed else 0
