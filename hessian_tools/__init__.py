"""hessian-tools: curvature of trained networks, with error bars.

Data flows one way: checkpoint → :class:`HessianOperator` → estimator → result → report/figure.
"""
__version__ = "0.1.0"
