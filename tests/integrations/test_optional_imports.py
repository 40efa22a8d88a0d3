"""``import fastkd`` and ``fastkd.integrations.hf`` never need the Hugging Face stack, and
``fastkd.integrations.trl`` without it says how to install it. Runs whether or not it is installed
(a subprocess hides it)."""

import subprocess
import sys
import textwrap


def test_import_fastkd_needs_no_transformers():
    code = textwrap.dedent("""
        import sys
        for name in ("transformers", "trl", "accelerate", "datasets"):
            sys.modules[name] = None  # any import of them raises ImportError
        import fastkd, fastkd.integrations, fastkd.integrations.hf
        try:
            import fastkd.integrations.trl
        except ImportError as error:
            assert "pip install fastkd[hf]" in str(error), error
        else:
            raise AssertionError("fastkd.integrations.trl imported without trl")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
