"""PEFT's own generic tuner tests, run against RankMoE (see ``conftest.py`` and ``scripts/fetch_peft_tests.py``)."""
