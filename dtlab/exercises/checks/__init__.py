"""One module an exercise, named as its skeleton file: ``check(mod, rank, world, note)`` runs the
learner's module ``mod`` (on every rank of a real process group where the exercise is
distributed) and returns what differed from the lab's reference, one line per failure, with the
classic mistake named where it is recognised. ``common.py`` holds what they share."""
