"""Teachers score a rollout's tokens; they never train and never generate.

``local.LocalTeacher`` (a model in this process) and ``remote.RemoteTeacher`` (a server speaking the
OpenAI-compatible completions API with prompt log-probs) score token ids they are given;
``view.TeacherView`` decides which ids: the student's own, the student's completion after the
teacher's rendering of the prompt, or (another tokenizer) the completion's text in the teacher's
tokens, aligned back on byte offsets (``alignment``).
"""

from opd.teachers.base import InProcessTeacher, Teacher
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.view import Scored, TeacherView

__all__ = ["InProcessTeacher", "LocalTeacher", "RemoteTeacher", "Scored", "Teacher", "TeacherView"]
