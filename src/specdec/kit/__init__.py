"""The course kit: everything that is *not* an exercise.

Students never edit this sub-package. Both the student package (`specdec`) and the
reference solution (`specdec_ref`) import it, so the reference never duplicates kit code.

- `models`   toy models with the mlx-lm call/cache interface (Markov-chain LM, tiny llama)
- `loading`  load any mlx-lm model (or the embedded pair) and check a draft/target pair
- `impl`     pick the implementation under test: `ref` (solutions) or `student` (src)
- `stats`    per-run speculative decoding statistics
- `timing`   timers and BLAS detection for benchmarks
- `cli`      the `specdec` command: one module per subcommand (generate, bench, grade, doctor)
             and `cli.common` for what generate and bench share (flags, checks, models, decoding)
- `tasks`    the registry of the course's tasks: week, day, task, function, chapter
- `grade`    the scoreboard behind `specdec grade`
- `drafters`, `config`, `contracts`, `metrics`   the provided halves of those exercise modules
             (base classes, tables, helpers): one copy that both trees import and re-export
"""
