"""Images + landmark files -> nnU-Net raw dataset (label balls, dataset.json, landmarks.json)."""
from nnlandmark_h3de.conversion.ball_radius import ball_radius_mm, nnunet_target_spacing
from nnlandmark_h3de.conversion.case_matching import IMAGE_SUFFIXES, match_cases
from nnlandmark_h3de.conversion.draw_balls import ball_voxels, draw_balls
from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning
from nnlandmark_h3de.conversion.images_2d import (PICTURE_SUFFIXES, downscale_2d, downscaled_geometry, open_picture,
                                                  read_picture)
from nnlandmark_h3de.conversion.raw_dataset import (convert_dataset, dataset_folder_name, install_splits,
                                                    raw_dataset_folder)
# landmarks.json is read in landmarks/ (dataset_file.py); re-exported here for existing users
from nnlandmark_h3de.landmarks.dataset_file import (DatasetFileError, load_dataset_landmarks, load_dataset_test_cases,
                                                    load_dataset_test_sets, read_dataset_landmark_info)
