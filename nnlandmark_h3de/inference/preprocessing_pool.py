"""Preprocessing of the cases to predict, a bounded number ahead in worker processes.

Unlike nnU-Net's data iterator, an unreadable case yields an error record naming its files instead of
aborting the run (the predictor reports it and goes on). With regional preprocessing (two stages from
image files) a case is only read, cropped and normalised here; its tiles' regions are resampled later
(regional_preprocessing.py).
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Iterator, List, Optional, Sequence

from nnlandmark_h3de.inference.regional_preprocessing import read_normalized_case

__all__ = ["preprocess_case", "preprocessed_cases"]


def preprocess_case(files, seg_prev, ofile, plans_manager, configuration_manager, dataset_json,
                    regional: bool = False) -> dict:
    """nnU-Net's preprocessor on one case (`regional`: all but the resampling, see regional_preprocessing.py);
    errors come back as a record naming the files."""
    try:
        if regional:
            case = read_normalized_case(list(files), plans_manager, configuration_manager, dataset_json)
            return {"data": case, "data_properties": case.properties, "ofile": ofile, "files": list(files)}
        pre = configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case(files, seg_prev, plans_manager, configuration_manager, dataset_json)
        return {"data": data, "data_properties": props, "ofile": ofile, "files": list(files)}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e} ({', '.join(map(str, files))})", "ofile": ofile}


def preprocessed_cases(input_list_of_lists: Sequence, seg_from_prev_stage_files: Optional[Sequence],
                       output_filenames_truncated: Optional[Sequence], plans_manager, configuration_manager,
                       dataset_json, regional: bool, num_processes: int) -> Iterator[dict]:
    """preprocess_case's records in input order, from `num_processes` workers (0 = in this process)."""
    outs = output_filenames_truncated or [None] * len(input_list_of_lists)
    segs = seg_from_prev_stage_files or [None] * len(input_list_of_lists)
    jobs = [(files, seg, o, plans_manager, configuration_manager, dataset_json, regional)
            for files, seg, o in zip(input_list_of_lists, segs, outs)]
    if num_processes == 0:
        return (preprocess_case(*job) for job in jobs)
    return _pooled(jobs, min(num_processes, len(jobs)))


def _pooled(jobs: List[tuple], n_proc: int) -> Iterator[dict]:
    """Ordered results of preprocess_case from a spawn pool, at most n_proc + 1 cases in flight."""
    with multiprocessing.get_context("spawn").Pool(n_proc) as pool:
        pending, it = deque(), iter(jobs)
        for job in it:
            pending.append(pool.apply_async(preprocess_case, job))
            if len(pending) > n_proc:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(preprocess_case, nxt))
            yield result
