-- One evaluation batch scored per problem, in one query over the documented view.
--   psql "$DATABASE_URL" -v tenant=acme -v batch=eval-1 -f score.sql
-- Each task wrote {"problem", "passed", "total", "score"} to $AGENTTASK_RESULT_FILE. A solution
-- that crashed, hung past its timeout or was rejected wrote nothing: it scores 0.
select labels ->> 'problem'                                        as problem,
       count(*)                                                    as solutions,
       count(*) filter (where phase <> 'Succeeded')                as did_not_finish,
       count(*) filter (where (result ->> 'score')::numeric = 1)   as fully_correct,
       round(avg(coalesce((result ->> 'score')::numeric, 0)), 2)   as mean_score
from agenttask.task_results
where tenant = :'tenant'
  and batch_id = :'batch'
group by 1
order by 1;
