"""The paper's RL baselines in the same framework as RiC: MORLHF (one policy per preference, RL on the
weighted reward) and Rewarded Soups (one policy per reward, weights interpolated per preference).

Both train LoRA adapters with TRL's ``GRPOTrainer``, which stands in for the paper's PPO (TRL has removed
its PPO trainer; GRPO with several reward functions and weights is how TRL users do multi-reward RL today).
They share RiC's base model, LoRA settings, data split, reward space and sampling, and are evaluated by the
same :class:`ric.evaluation.PreferenceSweep`. The core does not import this package: ``pip install
'ric[baselines]'`` adds TRL.
"""
