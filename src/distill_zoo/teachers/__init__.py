"""Teachers: reading checkpoints safely, the on-demand store, ensembles and routes of
checkpoints, and the output cache that lets later epochs skip the teacher."""

from distill_zoo.teachers.checkpoints import extract_state_dict, load_weights, read_checkpoint
from distill_zoo.teachers.ensemble import TeacherEnsemble, TeacherRoute
from distill_zoo.teachers.store import TEACHER_FILE

__all__ = [
    "TEACHER_FILE",
    "TeacherEnsemble",
    "TeacherRoute",
    "extract_state_dict",
    "load_weights",
    "read_checkpoint",
]
