"""Verification: what "correct" means for every op, shared by the tests and ``fusedpg verify``.

Nothing here ships in a loss path; the ops never import this package.

* ``tolerance``        the tolerance model (docs/design.md#tolerance-model): ``|ours - truth| <= 2 |torch_D - truth| + slack_D``.
* ``cases_logprob``    ``linear_logprob_entropy`` / ``logprob_entropy`` against eager-D and float64 truth.
* ``cases_objective``  random, valid ``pg_loss`` inputs and options for every loss variant.
* ``cases_pg``         ``fused_linear_pg_loss`` (loss, gradients, metrics) against its materialised reference.
* ``cases_prefix``     ``shared_prefix_attention`` (o, dq, dk, dv) against the dense reference.
* ``trl_oracle``       a plain-torch statement of TRL's ``GRPOTrainer._compute_loss``, the parity oracle of
                       ``pg_loss`` (it takes TRL's loss-type facts from ``fusedpg.integrations.trl_support``).
* ``runner``           ``fusedpg verify``: the table of worst comparisons per op, output and dtype.
"""
