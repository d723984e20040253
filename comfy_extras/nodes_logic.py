"""Flow and arithmetic helpers of ComfyUI's core set: ComfySwitchNode (pick one of two inputs by a boolean,
evaluating only the chosen branch) and ComfyMathExpression (a formula over numeric inputs a, b, c, ...).

ComfyUI declares the math node's variables as a growing list of sockets named "values.a", "values.b", ...;
this node protocol has no growing inputs, so the first one is required and the next ones up to
MATH_VARIABLES are optional, under the same names, so saved workflows link to them unchanged.
"""

from __future__ import annotations

import ast
import math
import operator
import string

MATH_VARIABLES = string.ascii_lowercase[:10]  # values.a ... values.j


class ComfySwitchNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"switch": ("BOOLEAN", {"default": False}),
                             "on_false": ("*", {"lazy": True}),
                             "on_true": ("*", {"lazy": True})}}

    RETURN_TYPES = ("*",)
    RETURN_NAMES = ("output",)
    FUNCTION = "switch_value"
    CATEGORY = "logic"
    DESCRIPTION = "Passes on_true when switch is on, else on_false; only the chosen input is computed."

    def check_lazy_status(self, switch, on_false=None, on_true=None):
        chosen = "on_true" if switch else "on_false"
        return [chosen] if (on_true if switch else on_false) is None else []

    def switch_value(self, switch, on_false=None, on_true=None):
        return (on_true if switch else on_false,)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_FUNCTIONS = {"floor": math.floor, "ceil": math.ceil, "round": round, "abs": abs, "min": min, "max": max,
              "sqrt": math.sqrt, "pow": math.pow, "exp": math.exp, "log": math.log, "log2": math.log2,
              "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan, "int": int,
              "float": float, "clamp": lambda x, lo, hi: max(lo, min(hi, x))}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1024  # bounds ** so a typo cannot ask for a number with millions of digits


def evaluate_expression(expression: str, variables: dict):
    """Arithmetic, comparisons, `x if c else y` and a fixed set of math functions over `variables`.

    Parsed with `ast` and walked node by node: nothing else (attributes, names outside the variables and
    constants, other calls) can be reached, so an expression cannot run code."""
    try:
        tree = ast.parse(expression.strip() or "0", mode="eval")
    except SyntaxError as e:
        raise ValueError(f"Math expression {expression!r} is not valid: {e.msg}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in variables:
                return variables[node.id]
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ValueError(f"Math expression uses {node.id!r}, which is not connected "
                             f"(inputs: {', '.join(sorted(variables)) or 'none'})")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError(f"Math expression exponent {right} is too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = ev(comparator)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords):
            return _FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"Math expression {expression!r}: {ast.unparse(node)!r} is not supported "
                         f"(numbers, variables, + - * / // % **, comparisons, and, or, not, x if c else y, "
                         f"{', '.join(sorted(_FUNCTIONS))})")

    return ev(tree)


class ComfyMathExpression:
    @classmethod
    def INPUT_TYPES(cls):
        first, *rest = MATH_VARIABLES
        return {"required": {"expression": ("STRING", {"default": "a + b", "multiline": True}),
                             f"values.{first}": ("FLOAT,INT", {"forceInput": True})},
                "optional": {f"values.{v}": ("FLOAT,INT", {"forceInput": True}) for v in rest}}

    RETURN_TYPES = ("FLOAT", "INT")
    RETURN_NAMES = ("FLOAT", "INT")
    FUNCTION = "evaluate"
    CATEGORY = "utils/math"
    DESCRIPTION = "Evaluates a formula over the connected inputs a, b, c, ...; outputs it as FLOAT and INT."

    def evaluate(self, expression, **values):
        variables = {k.split(".", 1)[1]: v for k, v in values.items() if v is not None}
        result = evaluate_expression(expression, variables)
        if isinstance(result, bool):
            result = int(result)
        if not isinstance(result, (int, float)) or (isinstance(result, float) and not math.isfinite(result)):
            raise ValueError(f"Math expression {expression!r} gave {result!r}, not a finite number")
        return (float(result), int(result))


NODE_CLASS_MAPPINGS = {"ComfySwitchNode": ComfySwitchNode, "ComfyMathExpression": ComfyMathExpression}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfySwitchNode": "Switch", "ComfyMathExpression": "Math Expression"}
