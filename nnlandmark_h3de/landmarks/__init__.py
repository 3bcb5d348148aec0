"""Landmark model, image geometry and landmark file formats, including a raw dataset's landmarks.json."""
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras, ras_to_lps
from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image
from nnlandmark_h3de.landmarks.atomic import atomic_path, atomic_write_text
from nnlandmark_h3de.landmarks.dataset_names import landmark_names
from nnlandmark_h3de.landmarks.io import (LANDMARK_SUFFIXES, OUTPUT_FORMATS, is_landmark_file, landmark_format,
                                          read_landmarks, write_landmarks)
from nnlandmark_h3de.landmarks.io_mml import MML_NAMES, read_mml_case
from nnlandmark_h3de.landmarks.pairs import find_lr_pairs
from nnlandmark_h3de.landmarks.dataset_file import (LANDMARKS_FILE, PSEUDO_LABELS_FILE, DatasetFileError,
                                                    exact_label_cases, landmark_info_dict, landmarks_json_dict,
                                                    load_case_subjects, load_dataset_landmarks,
                                                    load_dataset_test_cases, load_dataset_test_sets,
                                                    read_dataset_landmark_info)
