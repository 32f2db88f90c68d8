"""Runnable demonstrations of layerfreeze, shown by ``layerfreeze demo NAME``.

Each demo module has a ``main()`` that prints its story; the ``seed`` demo
also has ``run()``, which returns what it measured so that tests can check it.
Demos may use the optional ``rich`` dependency; the core never imports them.
"""
