from .most_uncertain import MostUncertain
