"""Exercises: skeletons with TODOs a learner fills (skeletons/), reference solutions
(solutions/), and the checker that grades them (checker.py).

    dtlab exercise ring_allreduce --dest my/       # writes my/ring_allreduce.py
    dtlab check ring_allreduce --impl my/ring_allreduce.py
"""
