# Placeholder until the Cython backend lands: builds nothing.
from setuptools import setup

setup()
