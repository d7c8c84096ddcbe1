"""Make preference pairs from sampled completions: ``prefl pairs`` and ``prefl label``.

- :mod:`prefl.labelling.make`: label with a reward model, a reward function or a judge, in
  Lightning's predict loop (``prefl pairs``).
- :mod:`prefl.labelling.store`: a person's decisions on disk, nothing confirmed ever lost.
- :mod:`prefl.labelling.server`: the local labelling page (``prefl label``, the ``label``
  extra: Flask).

The pure parts (reading samples, choosing pairs, the judge's both-orders rule) are in
:mod:`prefl.data.pairs` and :mod:`prefl.data.judging`. Nothing is imported here, so that the
command-line help answers without loading torch.
"""
