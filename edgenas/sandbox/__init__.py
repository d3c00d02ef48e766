"""The jail: untrusted candidate code runs here, and only here (jail.py: the layers; zygote.py: one job per fork;
inside.py: what a job does; wire.py and messages.py: what crosses the border; guard.py: readable refusals)."""
