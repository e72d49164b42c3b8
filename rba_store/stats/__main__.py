"""``python -m rba_store.stats --blocks L --width D --tokens T``: the memory figures of
``stats``, ``fit`` and ``select`` for a model shape, from its configuration alone
(:mod:`rba_store.stats.memory`)."""

from rba_store.stats.memory import main

main()
