"""Reads the machine code (SASS) that nvdisasm prints for a cubin: the functions, their loops, and
what one iteration of each streaming loop does.

A loop is a backward branch: ``BRA`` to a label at or before the branch. One iteration is counted
along the *fast path* through the body: the path from the label to the backward branch that issues
the fewest instructions (NOPs excluded), i.e. the one taken when the body's rare branches are not
(a running-max rescale, a scalar fallback next to a 16-byte store). Triton's loops have no branch
in their body, so the fast path is the whole body. A *streaming loop* is an innermost loop (no
other loop inside it) that loads from global memory.

Global memory widths per thread: ``.128`` 16 bytes, ``.64`` 8, ``.U16``/``.S16`` 2, ``.U8``/``.S8`` 1,
otherwise 4. LDGSTS (a global-to-shared copy) counts as a load.
"""

import re
from dataclasses import dataclass, field

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?!\.)(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):\s*$")
_SECTION = re.compile(r"^\s*\.section\s+([^,\s]+)")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_INFO_ATTRIBUTE = re.compile(r"//----- nvinfo : (EIATTR_\w+)")
_WORD = re.compile(r"\.word\s+0x([0-9a-f]+)")

_LOADS = ("LDG", "LDGSTS")
_STORES = ("STG",)
_ATOMICS = ("ATOMG", "RED", "REDG")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str

    @property
    def base(self):
        return self.opcode.split(".")[0]

    @property
    def width(self):
        """Bytes per thread of a memory instruction."""
        parts = self.opcode.split(".")[1:]
        if "128" in parts:
            return 16
        if "64" in parts:
            return 8
        if "U16" in parts or "S16" in parts:
            return 2
        if "U8" in parts or "S8" in parts:
            return 1
        return 4


@dataclass
class Function:
    name: str
    instructions: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # label → address of the next instruction
    threads: int = 0  # from EIATTR_REQNTID (Triton) or EIATTR_MAX_THREADS (__launch_bounds__)


@dataclass(frozen=True)
class LoopBody:
    """One iteration of a loop, counted statically (see the module docstring)."""

    start: int
    end: int
    instructions: int
    load_bytes: int  # per thread and iteration
    store_bytes: int
    wide_loads: int  # 16-byte loads
    narrow_loads: int  # loads under 16 bytes
    mufu: int  # special-function instructions (ex2, lg2, rcp, ...)
    shuffles: int
    barriers: int

    @property
    def bytes_per_thread(self):
        return self.load_bytes + self.store_bytes


def parse(text):
    """{function name: Function} of one nvdisasm listing (text sections and nv.info attributes)."""
    functions = {}
    section = None
    pending_label = None
    attribute = None
    words = []
    for line in text.splitlines():
        section_match = _SECTION.match(line)
        if section_match:
            section = section_match.group(1)
            attribute = None
            continue
        if section is None:
            continue
        if section.startswith(".text."):
            function = functions.setdefault(section[len(".text."):], Function(section[len(".text."):]))
            label = _LABEL.match(line.strip())
            if label:
                pending_label = label.group(1)
                function.labels[pending_label] = None
                continue
            instruction = _INSTRUCTION.match(line)
            if instruction:
                address = int(instruction.group(1), 16)
                for name, value in function.labels.items():
                    if value is None:
                        function.labels[name] = address
                function.instructions.append(_instruction(address, instruction.group(2)))
        elif section.startswith(".nv.info."):
            name = section[len(".nv.info."):]
            found = _INFO_ATTRIBUTE.search(line)
            if found:
                attribute, words = found.group(1), []
                continue
            word = _WORD.search(line)
            if word and attribute in ("EIATTR_REQNTID", "EIATTR_MAX_THREADS"):
                words.append(int(word.group(1), 16))
                if len(words) == 3:
                    function = functions.setdefault(name, Function(name))
                    function.threads = words[0] * words[1] * words[2]
                    attribute = None
    return functions


def _instruction(address, text):
    predicate = ""
    if text.startswith("@"):
        predicate, _, text = text.partition(" ")
    opcode, _, operands = text.strip().partition(" ")
    return Instruction(address, predicate, opcode, operands.strip())


def loops(function):
    """(start, end) address ranges of the function's loops, one per backward branch."""
    found = []
    for instruction in function.instructions:
        if instruction.base != "BRA":
            continue
        target = _BRANCH_TARGET.search(instruction.operands)
        if target is None:
            continue
        start = function.labels.get(target.group(1))
        if start is not None and start <= instruction.address:
            found.append((start, instruction.address))
    return sorted(set(found))


def _fast_path(function, start, end):
    """The instructions of the shortest path from ``start`` to the backward branch at ``end``
    (forward branches only: the loop is innermost)."""
    body = [i for i in function.instructions if start <= i.address <= end]
    best = {start: ()}  # address → the shortest instruction path reaching it
    for index, instruction in enumerate(body):
        path = best.get(instruction.address)
        if path is None:
            continue
        path = path + ((instruction,) if instruction.base != "NOP" else ())
        if instruction.address == end:
            return list(path)
        successors = []
        conditional = instruction.predicate not in ("", "@PT")
        if instruction.base == "BRA":
            target = _BRANCH_TARGET.search(instruction.operands)
            address = function.labels.get(target.group(1)) if target else None
            if address is not None and instruction.address < address <= end:
                successors.append(address)
            if conditional or instruction.opcode.startswith("BRA.DIV"):
                successors.append(body[index + 1].address)
        elif not (instruction.base == "EXIT" and not conditional):
            successors.append(body[index + 1].address)
        for address in successors:
            if address not in best or len(path) < len(best[address]):
                best[address] = path
    return []


def streaming_loops(function):
    """LoopBody of every innermost loop whose fast path loads from global memory, in address order."""
    ranges = loops(function)
    innermost = [(a, b) for a, b in ranges
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in ranges)]
    bodies = []
    for start, end in innermost:
        body = _fast_path(function, start, end)
        loads = [i for i in body if i.base in _LOADS]
        if not loads:
            continue
        bodies.append(LoopBody(
            start=start, end=end, instructions=len(body),
            load_bytes=sum(i.width for i in loads),
            store_bytes=sum(i.width for i in body if i.base in _STORES + _ATOMICS),
            wide_loads=sum(1 for i in loads if i.width == 16),
            narrow_loads=sum(1 for i in loads if i.width < 16),
            mufu=sum(1 for i in body if i.base == "MUFU"),
            shuffles=sum(1 for i in body if i.base == "SHFL"),
            barriers=sum(1 for i in body if i.base == "BAR")))
    return bodies
