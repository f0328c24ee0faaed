"""kvpass's evaluation tools, apart from the compiler: the pass key and RULER-style tasks (``tasks``), their
runs and perplexity/KL on real text (``evaluate``), the quality/keys frontier (``frontier``), per-layer
estimator quality on real activations (``quality``) and the real text they read (``text``).

The compiler (``kvpass.sites``, ``passes``, ``ops``, ``backend``, ``api``, ``export``) never imports this
package; it imports the compiler, the runtime and the kernels (``tests/test_layout.py`` holds the arrows).
"""
